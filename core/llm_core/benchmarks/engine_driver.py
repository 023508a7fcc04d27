"""EngineDriver: runs a benchmark's requests through an in-process LLMEngine and records when
every token appears.

Requests arrive all at once, at a Poisson ``request_rate``, and/or under a ``concurrency`` cap
(at most that many in flight, a new one admitted as one finishes). The driver calls
``engine.step()`` in a loop and timestamps each request's new tokens as the step returns them,
which is what a streaming client of the same engine would see, minus the network.

With speculative decoding on, a run also reports the acceptance of its own steps (the change
of ``engine.spec_stats`` over the run): ``spec_acceptance_rate``, ``spec_mean_acceptance_length``
and ``spec_acceptance_per_pos`` (the fraction of verifications that accepted position ``i``).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llm_core.benchmarks.memory import MemoryMonitor
from llm_core.benchmarks.results import RunResult
from llm_core.benchmarks.timeline import RequestTimeline
from llm_core.engine.speculative import SpecStats
from llm_core.sampling_params import GuidedDecodingParams, SamplingParams


def arrival_offsets(num: int, request_rate: float | None, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: all at 0 for no rate, else a
    Poisson process (exponential gaps of mean ``1 / request_rate``), seeded."""
    if not request_rate or request_rate == float("inf"):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()


class EngineDriver:
    """``guided``: every request is constrained by it (a grammar that ends sooner ends the
    request sooner); the run then reports what the masks cost per step."""

    def __init__(
        self, engine: Any, detokenize: bool = True, guided: GuidedDecodingParams | None = None
    ):
        self.engine = engine
        self.detokenize = detokenize
        self.guided = guided
        self._ids = 0

    def params(
        self, output_len: int, temperature: float = 0.0, ignore_eos: bool = True
    ) -> SamplingParams:
        """Exactly ``output_len`` tokens (EOS ignored, unless a grammar ends first; at most
        ``output_len`` when EOS counts), greedy unless a temperature is given."""
        return SamplingParams(
            max_tokens=output_len,
            ignore_eos=ignore_eos,
            temperature=temperature,
            detokenize=self.detokenize,
            guided_decoding=self.guided,
        )

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
        engine = self.engine
        params = self.params(output_len, ignore_eos=ignore_eos)
        offsets = arrival_offsets(len(prompts), request_rate, seed)
        pending = deque(range(len(prompts)))
        timelines: dict[str, RequestTimeline] = {}
        seen: dict[str, int] = {}
        cap = concurrency or len(prompts)
        in_flight = 0
        bar = tqdm(total=len(prompts), desc=desc, unit="req", disable=not progress, leave=False)
        runner, grammar = engine.runner, engine.grammar
        before = (runner.guided_seconds, runner.guided_steps)
        spec_before = _copy(engine.spec_stats)
        with MemoryMonitor(engine.backend) as mem:
            start = time.perf_counter()
            # When each of the ``cap`` slots became free: a request held back by the cap is
            # sent (its clock starts) when a slot frees, as a client with a semaphore does.
            free_at = [start] * min(cap, len(prompts))
            while pending or in_flight:
                now = time.perf_counter()
                while pending and in_flight < cap and start + offsets[pending[0]] <= now:
                    i = pending.popleft()
                    rid = f"bench-{self._ids}"
                    self._ids += 1
                    arrival = max(start + offsets[i], heapq.heappop(free_at))
                    timelines[rid] = RequestTimeline(len(prompts[i]), arrival)
                    seen[rid] = 0
                    engine.add_request(rid, prompts[i], params)
                    in_flight += 1
                if not in_flight:
                    time.sleep(max(0.0, start + offsets[pending[0]] - time.perf_counter()))
                    continue
                outputs = engine.step()
                when = time.perf_counter()
                for out in outputs:
                    timeline = timelines.get(out.request_id)
                    if timeline is None:
                        continue
                    count = len(out.outputs[0].token_ids)
                    timeline.add_tokens(count - seen[out.request_id], when)
                    seen[out.request_id] = count
                    if out.finished:
                        in_flight -= 1
                        heapq.heappush(free_at, when)
                        bar.update(1)
            duration = time.perf_counter() - start
        bar.close()
        result = RunResult(list(timelines.values()), duration, mem.peak_rss, mem.peak_device_used)
        if self.guided is not None:
            mask_s, steps = runner.guided_seconds - before[0], runner.guided_steps - before[1]
            result.extra = {
                "guided_steps": steps,
                "guided_mask_ms_per_step": 1e3 * mask_s / max(1, steps),
                "guided_mask_share": mask_s / duration if duration > 0 else float("nan"),
                # Mean over every compile so far (warm-ups compile; measured runs hit the cache).
                "grammar_compile_ms": 1e3 * grammar.compile_seconds / max(1, grammar.compiles),
            }
        if engine.speculative_config is not None:
            result.extra.update(spec_figures(_since(spec_before, engine.spec_stats)))
        return result


def spec_figures(stats: SpecStats) -> dict[str, Any]:
    """The acceptance figures of a run's speculative-decoding counters (vLLM's meanings)."""
    drafts = stats.num_drafts
    return {
        "spec_num_drafts": drafts,
        "spec_num_draft_tokens": stats.num_draft_tokens,
        "spec_num_accepted_tokens": stats.num_accepted_tokens,
        "spec_acceptance_rate": stats.acceptance_rate,
        "spec_mean_acceptance_length": stats.mean_acceptance_length,
        "spec_acceptance_per_pos": {
            str(pos): n / drafts if drafts else 0.0 for pos, n in enumerate(stats.accepted_per_pos)
        },
    }


def _copy(stats: SpecStats) -> SpecStats:
    return _since(SpecStats(stats.k), stats)


def _since(before: SpecStats, now: SpecStats) -> SpecStats:
    """The counts of ``now`` minus those of ``before``."""
    delta = SpecStats(now.k)
    delta.num_drafts = now.num_drafts - before.num_drafts
    delta.num_draft_tokens = now.num_draft_tokens - before.num_draft_tokens
    delta.num_accepted_tokens = now.num_accepted_tokens - before.num_accepted_tokens
    delta.accepted_per_pos = [
        n - b for n, b in zip(now.accepted_per_pos, before.accepted_per_pos, strict=True)
    ]
    return delta
