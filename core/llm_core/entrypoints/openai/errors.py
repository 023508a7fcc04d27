"""APIError: every failure of the server, answered in OpenAI's error shape.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with the HTTP status
that says whose fault it is; the message says what to change. Also turns pydantic validation
errors into one readable message.
"""

from __future__ import annotations

import functools
import json
import re
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
        raise _validation_error(exc, model) from None


def _validation_error(exc: ValidationError, model: type[BaseModel]) -> APIError:
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        return APIError(
            400, f"the request body is not valid JSON ({detail}); send one JSON object",
            code="invalid_json",
        )  # fmt: skip
    if errors and not errors[0]["loc"] and errors[0]["type"] == "model_type":
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    by_field: dict[str, list[Any]] = {}
    for error in errors:
        by_field.setdefault(_field_path(error["loc"]), []).append(error)
    reports = [_report(path, field_errors, model) for path, field_errors in by_field.items()]
    return APIError(
        400,
        "invalid request: " + "; ".join(text for _, text in reports),
        param=reports[0][0],
        code="invalid_value",
    )


def _report(path: str, errors: list[Any], model: type[BaseModel]) -> tuple[str, str]:
    """The path and the description of one field's errors. A union field fails once per
    member: it is reported once, with every accepted form, or, where the value had one
    member's shape, with what is wrong inside it (the deepest error)."""
    inner = [e for e in errors if not e["type"].endswith("_type")]
    if len(errors) > 1 and not inner:
        forms = ", ".join(dict.fromkeys(_member_name(e["loc"]) for e in errors))
        return path, f"{path}: expected one of {forms}; got {_shorten(errors[0].get('input'))}"
    error = max(inner, key=lambda e: len(e["loc"])) if len(errors) > 1 else errors[0]
    path = _field_path(error["loc"], members=True)
    if error["type"] == "missing":
        return path, f"{path}: this field is required"
    text = f"{path}: {error['msg']}; got {_shorten(error.get('input'))}"
    allowed = _allowed_range(model, error)
    return path, text + (f" ({path} must be {allowed})" if allowed else "")


#: pydantic's errors for a number out of range.
_OUT_OF_RANGE = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _allowed_range(model: type[BaseModel], error: Any) -> str | None:
    """The range of a top-level number out of range, both ends where it has both: "in [0, 2]",
    "in (0, 1]", ">= 0" (pydantic's message names only the end it passed)."""
    loc = error["loc"]
    if error["type"] not in _OUT_OF_RANGE or len(loc) != 1:
        return None
    return _ranges(model).get(str(loc[0]))


@functools.cache
def _ranges(model: type[BaseModel]) -> dict[str, str]:
    """Each top-level number field's range, as the model's JSON schema declares it."""
    ranges = {}
    for name, field in model.model_json_schema()["properties"].items():
        for schema in (field, *field.get("anyOf", ())):
            if "exclusiveMinimum" in schema:
                low = f"({schema['exclusiveMinimum']}"
            else:
                low = f"[{schema['minimum']}" if "minimum" in schema else ""
            if "exclusiveMaximum" in schema:
                high = f"{schema['exclusiveMaximum']})"
            else:
                high = f"{schema['maximum']}]" if "maximum" in schema else ""
            if low and high:
                ranges[name] = f"in {low}, {high}"
            elif low:
                ranges[name] = f"{'>' if low[0] == '(' else '>='} {low[1:]}"
            elif high:
                ranges[name] = f"{'<' if high[-1] == ')' else '<='} {high[:-1]}"
    return ranges


def _field_path(loc: tuple[int | str, ...], *, members: bool = False) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``messages[0].content``: the path up to the
    first union tag, or (``members``) the whole path with the tags dropped."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif _is_type_tag(item):
            if not members:
                break
        else:
            path += f".{item}" if path else item
    return path or "body"


def _member_name(loc: tuple[int | str, ...]) -> str:
    tags = [str(item) for item in loc if isinstance(item, str) and _is_type_tag(item)]
    # a validated type shows as "function-before[_integral(), int]": name the type
    return _VALIDATED.sub(r"\1", tags[0]) if tags else "a valid value"


#: How pydantic names a type with a validator in a union tag.
_VALIDATED = re.compile(r"function-\w+\[[^,\[\]]*, (\w+)\]")


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
