"""What the baselines share: requests run in static waves, each wave sent when the previous one
has finished (neither transformers' ``generate`` nor a llama.cpp batch admits requests mid-run)."""

from __future__ import annotations

import abc
import time

from tqdm.auto import tqdm

from llm_core.benchmarks.memory import MemoryMonitor
from llm_core.benchmarks.results import RunResult
from llm_core.benchmarks.timeline import RequestTimeline


class WaveBaseline(abc.ABC):
    """A baseline that runs a wave of prompts at a time (``_run_wave``)."""

    #: The most sequences one wave may hold (None: no limit of the baseline's own).
    max_seqs: int | None = None

    @abc.abstractmethod
    def _run_wave(
        self, prompts: list[list[int]], output_len: int, arrival: float
    ) -> list[RequestTimeline]:
        """Run ``prompts`` together, all sent at ``arrival``; their timelines."""

    def run(
        self,
        prompts: list[list[int]],
        output_len: int,
        concurrency: int | None = None,
        progress: bool = False,
        desc: str = "baseline",
    ) -> RunResult:
        wave = concurrency or len(prompts)
        if self.max_seqs is not None:
            wave = min(wave, self.max_seqs)
        timelines: list[RequestTimeline] = []
        bar = tqdm(total=len(prompts), desc=desc, unit="req", disable=not progress, leave=False)
        with MemoryMonitor() as mem:
            start = time.perf_counter()
            for first in range(0, len(prompts), wave):
                group = prompts[first : first + wave]
                timelines += self._run_wave(group, output_len, time.perf_counter())
                bar.update(len(group))
            duration = time.perf_counter() - start
        bar.close()
        return RunResult(timelines, duration, mem.peak_rss, 0)
