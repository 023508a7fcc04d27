"""AsyncLLM: the engine behind an asyncio API, with streaming and abort (for the server).

One background thread owns the :class:`LLMEngine` and runs its steps; asyncio callers talk to
it through a command queue and get each request's outputs through their own asyncio queue.
Leaving the ``async for`` early (a client disconnect, a cancelled task) aborts the request and
frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from llm_core.config import EngineArgs
from llm_core.engine.llm_engine import LLMEngine
from llm_core.outputs import RequestOutput
from llm_core.sampling_params import SamplingParams

_STOP = object()


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue[Any] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._errored: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llm-core-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLM:
        return cls(LLMEngine(args))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that advanced it, the last one with
        ``finished=True``. Raises at once (RequestError) if the request is invalid."""
        if self._errored is not None:
            raise RuntimeError(f"the engine loop has stopped: {self._errored}")
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[Any] = asyncio.Queue()
        accepted: asyncio.Future[None] = loop.create_future()
        self._streams[request_id] = (loop, stream)
        self._commands.put(("add", request_id, prompt, params, loop, accepted))
        try:
            await accepted
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self._streams.pop(request_id, None) is not None:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------
    # the engine thread
    # ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                block = not engine.has_unfinished_requests()
                while True:
                    try:
                        command = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    if command is _STOP:
                        return
                    self._handle(command)
                    block = False
                for output in engine.step():
                    self._deliver(output.request_id, output)
        except BaseException as exc:  # report to every waiting stream, never die silently
            self._errored = exc
            for request_id in list(self._streams):
                self._deliver(request_id, exc)

    def _handle(self, command: tuple[Any, ...]) -> None:
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            return
        _, request_id, prompt, params, loop, accepted = command
        try:
            self.engine.add_request(request_id, prompt, params)
        except Exception as exc:
            self._streams.pop(request_id, None)
            loop.call_soon_threadsafe(_set_exception, accepted, exc)
            return
        loop.call_soon_threadsafe(_set_result, accepted)

    def _deliver(self, request_id: str, item: Any) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, item)


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
