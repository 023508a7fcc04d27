"""EventStreamResponse: server-sent events whose generator is always closed, however the
response ends.

Starlette stops iterating a streaming body when the client disconnects (or the send fails),
but leaves the async generator suspended until garbage collection. Closing it here at once
runs its cleanup, which aborts the engine requests behind the stream and frees their KV blocks.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` over ``events``. When the response ends, however it ends,
    ``events`` is closed and ``on_close`` called (even if ``events`` never started)."""

    def __init__(
        self, events: AsyncGenerator[str, None], on_close: Callable[[], None] | None = None
    ):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            if self._on_close is not None:
                self._on_close()
