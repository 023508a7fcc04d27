"""RunResult: one measured run (a batch, or a stream of requests at one load level) and the
figures it yields; ``combine`` takes the median of each figure over repeated runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_core.benchmarks.stats import LatencySummary, median_of
from llm_core.benchmarks.timeline import RequestTimeline

#: The latency metrics, each summarized in milliseconds.
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass(slots=True)
class RunResult:
    """Timelines of every request of a run, its wall time and peak memory (bytes)."""

    timelines: list[RequestTimeline]
    duration: float  # seconds, first arrival to last token
    peak_rss: int = 0
    peak_device_used: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> list[RequestTimeline]:
        return [t for t in self.timelines if t.ok]

    def figures(self) -> dict[str, Any]:
        """Flat figures: counts, throughputs (per second) and latency summaries (ms)."""
        done = self.completed
        out_tokens = sum(t.output_len for t in done)
        in_tokens = sum(t.prompt_len for t in done)
        dur = self.duration if self.duration > 0 else float("nan")
        tpots = [t.tpot for t in done if t.tpot is not None]
        result: dict[str, Any] = {
            "num_requests": len(self.timelines),
            "completed": len(done),
            "failed": len(self.timelines) - len(done),
            "duration_s": self.duration,
            "total_input_tokens": in_tokens,
            "total_output_tokens": out_tokens,
            "request_throughput": len(done) / dur,
            "output_throughput": out_tokens / dur,
            "total_token_throughput": (in_tokens + out_tokens) / dur,
            "ttft_ms": LatencySummary.of((t.ttft for t in done), 1e3).as_dict(),
            "tpot_ms": LatencySummary.of(tpots, 1e3).as_dict(),
            "itl_ms": LatencySummary.of((x for t in done for x in t.itls), 1e3).as_dict(),
            "e2e_ms": LatencySummary.of((t.e2e for t in done), 1e3).as_dict(),
            "peak_rss_bytes": self.peak_rss,
            "peak_device_used_bytes": self.peak_device_used,
        }
        errors = sorted({t.error for t in self.timelines if t.error})
        if errors:
            result["errors"] = errors[:5]
        result.update(self.extra)
        return result


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure over repeated runs (nested summaries included), the
    maximum of peak memory; other values are the first run's. ``num_iters`` says how many."""
    if not runs:
        return {}
    out = _combine_tree(runs)
    out["num_iters"] = len(runs)
    return out


def _combine_tree(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = _combine_tree([r[key] for r in runs])
        elif isinstance(first, bool) or not isinstance(first, int | float):
            out[key] = first
        elif key.startswith("peak_"):
            out[key] = max(r[key] for r in runs)
        else:
            out[key] = median_of(r[key] for r in runs)
    return out
