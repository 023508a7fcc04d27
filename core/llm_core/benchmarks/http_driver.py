"""HttpDriver: runs a benchmark's requests against a running OpenAI-compatible server.

Each request is ``POST {base_url}/v1/completions`` with ``stream: true`` (token-id prompt,
``max_tokens`` = the output length, ``ignore_eos`` unless the workload stops at EOS, greedy),
read as server-sent events: every ``data:`` chunk with text is a token arrival; the final usage
chunk (``stream_options.include_usage``) gives the exact output token count when the server
sends it. Requests arrive at a Poisson rate and/or under a concurrency cap, as in
:class:`~llm_core.benchmarks.engine_driver.EngineDriver`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from llm_core.benchmarks.engine_driver import arrival_offsets
from llm_core.benchmarks.memory import MemoryMonitor
from llm_core.benchmarks.results import RunResult
from llm_core.benchmarks.timeline import RequestTimeline

if TYPE_CHECKING:
    import httpx
from tqdm.auto import tqdm


class HttpDriver:
    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def served_model(self) -> str:
        """The model to ask for: the one given, or the first the server lists."""
        if self.model:
            return self.model
        import httpx

        resp = httpx.get(f"{self.base_url}/v1/models", headers=self.headers, timeout=30)
        resp.raise_for_status()
        models = resp.json().get("data") or []
        if not models:
            raise RuntimeError(f"{self.base_url}/v1/models lists no model; pass --served-model")
        self.model = str(models[0]["id"])
        return self.model

    def run(
        self,
        prompts: list[list[int]],
        output_len: int,
        concurrency: int | None = None,
        request_rate: float | None = None,
        seed: int = 0,
        progress: bool = False,
        desc: str = "requests",
        ignore_eos: bool = True,
    ) -> RunResult:
        model = self.served_model()
        return asyncio.run(
            self._run(
                prompts, output_len, model, concurrency, request_rate, seed, progress, desc,
                ignore_eos,
            )
        )  # fmt: skip

    async def _run(
        self,
        prompts: list[list[int]],
        output_len: int,
        model: str,
        concurrency: int | None,
        request_rate: float | None,
        seed: int,
        progress: bool,
        desc: str,
        ignore_eos: bool,
    ) -> RunResult:
        import httpx

        offsets = arrival_offsets(len(prompts), request_rate, seed)
        limit = asyncio.Semaphore(concurrency or len(prompts))
        bar = tqdm(total=len(prompts), desc=desc, unit="req", disable=not progress, leave=False)
        timelines = [RequestTimeline(len(p), 0.0) for p in prompts]
        pool = httpx.Limits(max_connections=concurrency or len(prompts))
        client_args: dict[str, Any] = {"timeout": self.timeout, "limits": pool}
        async with httpx.AsyncClient(headers=self.headers, **client_args) as client:

            async def one(i: int, start: float) -> None:
                await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
                async with limit:
                    timelines[i].arrival = time.perf_counter()
                    body = {
                        "model": model,
                        "prompt": prompts[i],
                        "max_tokens": output_len,
                        "temperature": 0.0,
                        "ignore_eos": ignore_eos,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    await self.stream(client, body, timelines[i])
                bar.update(1)

            with MemoryMonitor() as mem:
                start = time.perf_counter()
                await asyncio.gather(*(one(i, start) for i in range(len(prompts))))
                duration = time.perf_counter() - start
        bar.close()
        return RunResult(timelines, duration, mem.peak_rss, 0, {"client_side": True})

    async def stream(
        self, client: httpx.AsyncClient, body: dict[str, Any], timeline: RequestTimeline
    ) -> None:
        """Send one streaming completion and record its token arrivals (or its error)."""
        import httpx

        usage_tokens: int | None = None
        try:
            async with client.stream("POST", f"{self.base_url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    timeline.error = f"HTTP {r.status_code}: {text[:200]}"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        timeline.error = str(chunk["error"])[:200]
                        return
                    choices = chunk.get("choices") or []
                    if choices and choices[0].get("text"):
                        timeline.add_tokens(1, time.perf_counter())
                    usage = chunk.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
        except httpx.HTTPError as exc:
            timeline.error = f"{type(exc).__name__}: {exc}"
            return
        _reconcile(timeline, usage_tokens)


def _reconcile(timeline: RequestTimeline, usage_tokens: int | None) -> None:
    """Several tokens may share one chunk (or a token may decode to no text): when the server
    reports the true count, spread the difference over the chunk times seen, so TPOT divides
    by the real number of tokens."""
    if usage_tokens is None or not timeline.token_times or usage_tokens == timeline.output_len:
        return
    if usage_tokens > timeline.output_len:
        timeline.add_tokens(usage_tokens - timeline.output_len, timeline.token_times[-1])
    else:
        del timeline.token_times[usage_tokens:]
