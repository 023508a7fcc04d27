"""RequestGuard: the ASGI middleware that checks the API key and bounds the request body.

It runs before any routing or JSON parsing, so a client without the key, or with a body larger
than the limit, costs the server almost nothing: 401 before the body is read, 413 as soon as
the declared or received size passes the limit.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_core.entrypoints.openai.errors import APIError

#: Paths served without the API key: probes, the Prometheus scrape and the OpenAPI document.
PUBLIC_PATHS = frozenset({"/health", "/version", "/metrics", "/openapi.json"})


class RequestGuard:
    """Require ``Authorization: Bearer <api_key>`` (when a key is set) on every path but
    ``public_paths``, and refuse request bodies over ``max_body_bytes`` with 413.

    The body is read here, up to the limit, and replayed to the application; after it, the
    application's ``receive`` is the server's own, so disconnects still reach it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        public_paths: Iterable[str] = PUBLIC_PATHS,
    ):
        self.app = app
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guarded = self._key is not None and scope["path"] not in self.public_paths
        if guarded and not self._authorized(scope):
            error = APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                "with the key the server was started with (--api-key or LLM_CORE_API_KEY)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error.response()(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(declared)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(size)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _authorized(self, scope: Scope) -> bool:
        assert self._key is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    def _too_large(self, size: int) -> ASGIApp:
        error = APIError(
            413,
            f"the request body has {size} bytes, more than this server's limit of "
            f"{self.max_body_bytes}; send a smaller request (the limit is --max-request-bytes)",
            code="request_too_large",
        )
        return error.response()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
