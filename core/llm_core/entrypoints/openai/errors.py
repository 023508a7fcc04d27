"""APIError: every failure of the server, answered in OpenAI's error shape.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with the HTTP status
that says whose fault it is; the message says what to change. Also turns pydantic validation
errors into one readable message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

from llm_core.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

M = TypeVar("M", bound=BaseModel)

#: OpenAI's error type for each status (anything else 4xx is an invalid request).
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body. ``param`` names the offending request field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @property
    def error_type(self) -> str:
        if self.status in _TYPES:
            return _TYPES[self.status]
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> ErrorResponse:
        info = ErrorInfo(
            message=self.message, type=self.error_type, param=self.param, code=self.code
        )
        return ErrorResponse(error=info)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), self.status, headers=self.headers)

    @classmethod
    def from_status(cls, status: int, detail: str | None = None) -> APIError:
        """For the framework's own errors (unknown route, wrong method)."""
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        return cls(status, detail or phrase or "error")


def parse_request(model: type[M], body: bytes) -> M:
    """Validate a JSON body against ``model``; raise a 400 APIError that names every bad
    field, what it should be and what it got."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        return APIError(
            400, f"the request body is not valid JSON ({detail}); send one JSON object",
            code="invalid_json",
        )  # fmt: skip
    if errors and not errors[0]["loc"] and errors[0]["type"] == "model_type":
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    # A union field fails once per member: report the field once, with every accepted form.
    by_field: dict[str, list[Any]] = {}
    for error in errors:
        by_field.setdefault(_field_path(error["loc"]), []).append(error)
    parts = []
    for path, field_errors in by_field.items():
        got = _shorten(field_errors[0].get("input"))
        if len(field_errors) > 1 and all(e["type"].endswith("_type") for e in field_errors):
            forms = ", ".join(dict.fromkeys(_member_name(e["loc"]) for e in field_errors))
            parts.append(f"{path}: expected one of {forms}; got {got}")
        elif field_errors[0]["type"] == "missing":
            parts.append(f"{path}: this field is required")
        else:
            parts.append(f"{path}: {field_errors[0]['msg']}; got {got}")
    first = next(iter(by_field), None)
    return APIError(400, "invalid request: " + "; ".join(parts), param=first, code="invalid_value")


def _field_path(loc: tuple[int | str, ...]) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``messages[0].content`` (union tags dropped)."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif _is_type_tag(item):
            break
        else:
            path += f".{item}" if path else item
    return path or "body"


def _member_name(loc: tuple[int | str, ...]) -> str:
    tags = [str(item) for item in loc if isinstance(item, str) and _is_type_tag(item)]
    return tags[0] if tags else "a valid value"


def _is_type_tag(item: str) -> bool:
    # pydantic names union members by their type: "str", "list[int]", "StreamOptions"
    return (
        "[" in item or item in {"str", "int", "float", "bool", "dict", "list"} or item[:1].isupper()
    )


def _shorten(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
