"""AsyncLLM: the engine behind an asyncio API, with streaming, abort and a bounded queue.

One background thread owns the :class:`LLMEngine` and is the only thread that ever calls it:
asyncio callers send it commands (add, abort, stop) through a thread-safe queue, and it sends
each request's outputs back to the caller's event loop. Closing a :class:`RequestStream` early
(a client disconnect, a cancelled task) aborts its requests, which frees their KV blocks in
the engine's next iteration. A request the engine failed (a backend operator raised in its
step) ends its stream with :class:`RequestFailedError`; the engine keeps serving the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from llm_core.config import EngineArgs
from llm_core.engine.llm_engine import LLMEngine, RequestError
from llm_core.outputs import RequestOutput
from llm_core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llm_core.metrics import EngineMetrics

Prompt = str | list[int]


class EngineOverloadedError(RuntimeError):
    """The bounded queue is full: nothing was queued; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or crashed with the error given)."""


class RequestFailedError(RuntimeError):
    """The engine failed this request: a backend operator raised in a step that ran it.

    The request is finished and its KV blocks are freed; the engine goes on serving other
    requests. ``output`` is the request's last state (finish reason "error", the tokens made
    before the failure) and ``output.error`` the engine's message. For a server this is an
    internal error (HTTP 500), not the client's fault.
    """

    def __init__(self, output: RequestOutput):
        super().__init__(f"request {output.request_id} failed: {output.error}")
        self.request_id = output.request_id
        self.output = output


@dataclass(slots=True)
class _Add:
    requests: list[tuple[str, Prompt, SamplingParams]]
    arrival_time: float
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future[None]


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


_STOP = object()


class RequestStream:
    """The outputs of one or more requests added together, as the engine produces them.

    Iterate with ``async for``: each item is a :class:`RequestOutput` with the cumulative state
    of one request (vLLM's cumulative output kind); iteration ends once every request has
    finished. Use it as an async context manager (or call :meth:`abort`) so that leaving early
    aborts whatever is still running.

    Iteration raises :class:`RequestFailedError` when the engine fails one of the requests
    (the others of the stream are aborted: the stream ends there), and
    :class:`EngineDeadError` when the engine loop stops.
    """

    def __init__(self, owner: AsyncLLM, request_ids: list[str]):
        self._owner = owner
        self.request_ids = list(request_ids)
        self._live = set(request_ids)
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._ended = False

    @property
    def finished(self) -> bool:
        return not self._live

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._ended:
            raise StopAsyncIteration
        if not self._live and self._queue.empty():
            self._ended = True
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def abort(self) -> None:
        """Abort every request of this stream that has not finished (safe to call twice)."""
        if self._live:
            ids = list(self._live)
            for request_id in ids:
                self._owner._retire(request_id)
            self._live.clear()
            self._owner._send(_Abort(ids))

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    # called on the stream's event loop, scheduled from the engine thread
    def _put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestFailedError):
            if item.request_id not in self._live:
                return  # aborted meanwhile
            self._live.discard(item.request_id)
            self._owner._retire(item.request_id)
            self.abort()  # the stream ends with the error: its other requests are not wanted
            self._queue.put_nowait(item)
            return
        if isinstance(item, BaseException):
            for request_id in list(self._live):
                self._owner._retire(request_id)
            self._live.clear()
            self._queue.put_nowait(item)
            return
        if item.request_id not in self._live:
            return  # aborted meanwhile: outputs still in flight are dropped
        if item.finished:
            self._live.discard(item.request_id)
            self._owner._retire(item.request_id)
        self._queue.put_nowait(item)


class AsyncLLM:
    """An :class:`LLMEngine` run by a background thread, for asyncio servers.

    ``max_pending``: most requests in flight (queued or running) at once; one more makes
    :meth:`add_requests` raise :class:`EngineOverloadedError` and queue nothing. None: no
    limit. ``metrics``: recorded from the engine thread after every step.

    Thread rules: :meth:`add_requests`, :meth:`generate` and :meth:`RequestStream.abort` must
    be called from one event loop; :meth:`shutdown` from any thread.
    """

    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_pending: int | None = None,
        metrics: EngineMetrics | None = None,
    ):
        if max_pending is not None and max_pending < 1:
            raise ValueError(f"max_pending must be >= 1 or None, got {max_pending}")
        self.engine = engine
        self.max_pending = max_pending
        self.metrics = metrics
        # Facts that never change after loading; safe to read from any thread.
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model.vocab_size
        self.tokenizer: Any = engine.tokenizer
        self._commands: queue.Queue[Any] = queue.Queue()
        # request id -> stream; written by the event loop, read by the engine thread
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._pending = 0
        self._dead: EngineDeadError | None = None
        self._thread = threading.Thread(target=self._run, name="llm-core-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> AsyncLLM:
        return cls(LLMEngine(args), **kwargs)

    # ------------------------------------------------------------------------------------------
    # the asyncio side
    # ------------------------------------------------------------------------------------------

    @property
    def num_pending(self) -> int:
        """Requests added and not yet finished or aborted."""
        return self._pending

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return str(self._dead) if self._dead is not None else None

    async def add_requests(
        self,
        requests: Sequence[tuple[str, Prompt, SamplingParams]],
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue several requests, all or none, and return the stream of their outputs.

        Raises :class:`EngineOverloadedError` when they would exceed ``max_pending`` now,
        the engine's ``RequestError`` (a ValueError) when one of them cannot be served (then
        none is queued) or when there are more of them than ``max_pending``, and
        :class:`EngineDeadError` when the engine loop has stopped.
        """
        if self._dead is not None:
            raise self._dead
        items = list(requests)
        if not items:
            raise ValueError("add_requests() needs at least one request")
        ids = [rid for rid, _, _ in items]
        if len(set(ids)) != len(ids) or any(rid in self._streams for rid in ids):
            raise ValueError(f"request ids must be unique and not in use: {ids}")
        if self.max_pending is not None and len(items) > self.max_pending:
            raise RequestError(
                f"{len(items)} prompts in one request can never fit: at most "
                f"{self.max_pending} requests are in flight at once; send fewer prompts"
            )
        if self.max_pending is not None and self._pending + len(items) > self.max_pending:
            raise EngineOverloadedError(
                f"the server is at capacity ({self._pending} requests in flight, at most "
                f"{self.max_pending}); retry later",
                retry_after=1,
            )
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, ids)
        for rid in ids:
            self._streams[rid] = (loop, stream)
        self._pending += len(ids)
        self._set_pending_gauge()
        accepted: asyncio.Future[None] = loop.create_future()
        now = time.time() if arrival_time is None else arrival_time
        self._send(_Add(items, now, loop, accepted))
        try:
            await accepted
        except BaseException:
            # Failed, or the caller was cancelled while waiting: take everything back.
            stream.abort()
            raise
        return stream

    async def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> RequestStream:
        return await self.add_requests([(request_id, prompt, params)])

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that advanced it, the last one with
        ``finished=True``. Leaving the loop early aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        async with stream:
            async for output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        """Abort one request by id (from its stream's event loop); unknown ids are ignored."""
        entry = self._streams.get(request_id)
        if entry is not None and request_id in entry[1]._live:
            entry[1]._live.discard(request_id)
            self._retire(request_id)
            self._send(_Abort([request_id]))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort every request still in flight (their streams raise EngineDeadError), stop the
        engine thread and wait for it."""
        self._commands.put(_STOP)
        self._thread.join(timeout=timeout)

    def _send(self, command: Any) -> None:
        self._commands.put(command)

    def _retire(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._pending -= 1
            self._set_pending_gauge()

    def _set_pending_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.set_pending(self._pending)

    # ------------------------------------------------------------------------------------------
    # the engine thread: the only code that touches self.engine
    # ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        live: set[str] = set()  # requests in the engine, as the engine thread knows them
        try:
            while True:
                block = not engine.has_unfinished_requests()
                while True:
                    try:
                        command = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if command is _STOP:
                        self._stop(live, EngineDeadError("the server is shutting down"))
                        return
                    if isinstance(command, _Abort):
                        self._abort(command.request_ids, live)
                    else:
                        self._add(command, live)
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    if self.metrics is not None:
                        self.metrics.observe_outputs(outputs)
                    for output in outputs:
                        if output.finished:
                            live.discard(output.request_id)
                        failed = output.error is not None
                        self._deliver(
                            output.request_id, RequestFailedError(output) if failed else output
                        )
                if self.metrics is not None:
                    self.metrics.update_engine_state(engine)
        except BaseException as exc:  # report to every waiting stream, never die silently
            self._stop(live, EngineDeadError(f"the engine loop crashed: {exc!r}"))
            raise

    def _add(self, command: _Add, live: set[str]) -> None:
        added: list[str] = []
        try:
            for request_id, prompt, params in command.requests:
                self.engine.add_request(request_id, prompt, params, command.arrival_time)
                added.append(request_id)
        except Exception as exc:
            self.engine.abort_request(added)
            command.loop.call_soon_threadsafe(_set_exception, command.accepted, exc)
            return
        live.update(added)
        command.loop.call_soon_threadsafe(_set_result, command.accepted)

    def _abort(self, request_ids: list[str], live: set[str]) -> None:
        known = [rid for rid in request_ids if rid in live]
        self.engine.abort_request(known)
        live.difference_update(known)
        if self.metrics is not None:
            for rid in known:
                self.metrics.observe_abort(rid)

    def _stop(self, live: set[str], error: EngineDeadError) -> None:
        self._dead = error
        with contextlib.suppress(Exception):
            self._abort(list(live), live)
        streams = {id(entry[1]): entry for entry in list(self._streams.values())}
        for loop, stream in streams.values():
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                loop.call_soon_threadsafe(stream._put, error)
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.update_engine_state(self.engine)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        with contextlib.suppress(RuntimeError):  # the caller's loop has closed
            loop.call_soon_threadsafe(stream._put, item)


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
