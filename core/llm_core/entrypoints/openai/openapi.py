"""The server's OpenAPI document: every route's request body, answers and errors, generated
from the pydantic models in protocol.py.

The endpoints read their bodies themselves (``parse_request``: strict JSON-mode validation,
errors as 400s in OpenAI's shape, whatever the Content-Type), so FastAPI does not see their
bodies; each route declares its body with ``request_body``, naming the model that validates
it, and ``openapi_document`` adds those models' schemas to the document FastAPI builds. The API
key, when the server has one, is declared as a bearer security scheme on every route that
needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from llm_core.entrypoints.openai.protocol import ErrorResponse

#: Where a model's schema is in the document.
_REF = "#/components/schemas/{model}"

#: What each error status means on this server (docs/server.md, "Errors").
ERROR_STATUSES = {
    400: "Invalid request: malformed JSON, a wrong type, a missing field, a value out of range "
    "(NaN and infinities included), an unknown role, null content, a prompt too long for the "
    "context; the message and `param` name the field",
    401: "Missing or wrong API key (with `WWW-Authenticate: Bearer`)",
    404: "Not found: the `model` the request names is not served here (on /metrics: the "
    "server runs without metrics)",
    413: "The request body is larger than the server's limit (--max-request-bytes)",
    500: "A bug in the server: the message names the exception, the log has the traceback",
    503: "The server is overloaded (with `Retry-After`), or its engine has stopped",
}

#: Headers that come with an error status.
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "required": True}},
    503: {"Retry-After": {"description": "seconds to wait (when overloaded)", "required": False}},
}


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON body is one of ``models``."""
    refs = [{"$ref": _REF.format(model=model.__name__)} for model in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def responses(
    model: type[BaseModel] | None,
    *errors: int,
    description: str = "Successful response",
    stream: type[BaseModel] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses``: 200 with ``model`` (and, with ``stream``, a stream of
    server-sent events whose data are ``stream`` chunks), and each of ``errors`` in OpenAI's
    error shape."""
    ok: dict[str, Any] = {"description": description}
    if model is not None:
        ok["model"] = model
    if stream is not None:
        ok["description"] += (
            f"; with `stream: true`, server-sent events: `data: <{stream.__name__} JSON>` each, "
            "then `data: [DONE]` (a failure after the 200 is an ErrorResponse event before it)"
        )
        ok["content"] = {"text/event-stream": {"schema": _event(stream)}}
    answers: dict[int | str, dict[str, Any]] = {200: ok}
    for status in errors:
        answers[status] = _error(status)
    return answers


def _event(chunk: type[BaseModel]) -> dict[str, Any]:
    """The schema of one server-sent event (OpenAPI 3.1 has no ``itemSchema`` yet: the
    ``schema`` of an event stream describes each event, as tools read it)."""
    data = {"anyOf": [{"$ref": _REF.format(model=m.__name__)} for m in (chunk, ErrorResponse)]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": data,
                    },
                ]
            }
        },
    }


def _error(status: int) -> dict[str, Any]:
    # Written out rather than as FastAPI's "model", which would give it the media type of the
    # route's 200 (text/plain on /metrics); the schema comes from ``openapi_document``.
    answer: dict[str, Any] = {
        "description": ERROR_STATUSES[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}},
    }
    if status in _ERROR_HEADERS:
        answer["headers"] = {
            name: {**header, "schema": {"type": "string"}}
            for name, header in _ERROR_HEADERS[status].items()
        }
    return answer


def openapi_document(
    app: FastAPI,
    request_models: Iterable[type[BaseModel]],
    response_models: Iterable[type[BaseModel]] = (),
) -> Callable[[], dict[str, Any]]:
    """``app.openapi``: FastAPI's document, with the schemas of ``request_models``, of
    ``response_models`` (those the answers name beyond FastAPI's view: event stream chunks)
    and of the error body, and the bearer scheme required by every operation that declares a
    401."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "validation") for model in request_models
    ]
    answers: list[type[BaseModel]] = [*response_models, ErrorResponse]
    models += [(model, "serialization") for model in answers]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        _, top = models_json_schema(models, ref_template=_REF)
        for name, schema in top.get("$defs", {}).items():
            # one FastAPI put there already is an answer's part, from the same model
            schemas.setdefault(name, schema)
        locked = [
            operation
            for operations in document["paths"].values()
            for operation in operations.values()
            if "401" in operation["responses"]
        ]
        if locked:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        for operation in locked:
            operation["security"] = [{"apiKey": []}]
        app.openapi_schema = document
        return document

    return openapi
