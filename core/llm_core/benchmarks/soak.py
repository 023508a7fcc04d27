"""SoakRunner: a long, steady load on a server, watched over time (``llm-core bench soak``).

``concurrency`` streaming requests are kept in flight for ``duration`` seconds against an
OpenAI-compatible server (one ``llm-core bench soak`` starts itself, or any ``--base-url``).
Every ``interval`` seconds the runner reads the server's ``/metrics`` (its resident memory,
``process_resident_memory_bytes``, and ``llm_core_kv_cache_blocks_in_use``) and summarizes the
requests that finished in that interval (count, errors, TTFT and TPOT p50/p99). The verdict
compares resident memory after the warm-up intervals: its growth in MiB, the least-squares
slope in MiB per minute, and whether it stayed flat (growth within ``flat_mib``).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from llm_core.benchmarks.http_driver import HttpDriver
from llm_core.benchmarks.stats import LatencySummary
from llm_core.benchmarks.timeline import RequestTimeline


@dataclass(slots=True)
class SoakSample:
    """One interval: what the server reported at its end and what finished during it."""

    t: float  # seconds since the start
    rss_mib: float
    kv_blocks_in_use: float
    completed: int
    errors: int
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]


@dataclass(slots=True)
class SoakReport:
    config: dict[str, Any]
    samples: list[SoakSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def verdict(self, warmup: int, flat_mib: float) -> dict[str, Any]:
        """Resident memory after the first ``warmup`` samples: growth, slope, flat or not."""
        steady = self.samples[warmup:] or self.samples
        xs = [s.t / 60 for s in steady]
        ys = [s.rss_mib for s in steady]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
        growth = ys[-1] - ys[0]
        return {
            "rss_start_mib": ys[0],
            "rss_end_mib": ys[-1],
            "rss_max_mib": max(ys),
            "rss_growth_mib": growth,
            "rss_slope_mib_per_min": slope,
            "rss_flat": abs(growth) <= flat_mib and max(ys) - min(ys) <= 2 * flat_mib,
            "kv_blocks_in_use_after": self.samples[-1].kv_blocks_in_use if self.samples else None,
            "requests": sum(s.completed for s in self.samples),
            "errors": sum(s.errors for s in self.samples),
        }

    def as_dict(self, warmup: int, flat_mib: float) -> dict[str, Any]:
        return {
            "config": self.config,
            "samples": [asdict(s) for s in self.samples],
            "verdict": self.verdict(warmup, flat_mib),
            "error_examples": self.errors[:5],
        }


def scrape(text: str, name: str) -> float:
    """The value of an unlabelled (or first) sample ``name`` in Prometheus exposition text."""
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


class SoakRunner:
    def __init__(
        self,
        driver: HttpDriver,
        prompts: Any,  # a BenchPrompts: fresh prompts, so the prefix cache does not help
        output_len: int,
        concurrency: int,
        duration: float,
        interval: float,
    ):
        self.driver = driver
        self.prompts = prompts
        self.output_len = output_len
        self.concurrency = concurrency
        self.duration = duration
        self.interval = interval

    def run(self, progress: Any = None) -> SoakReport:
        return asyncio.run(self._run(progress))

    async def _run(self, progress: Any) -> SoakReport:
        import httpx

        model = self.driver.served_model()
        report = SoakReport(
            {
                "base_url": self.driver.base_url,
                "model": model,
                "concurrency": self.concurrency,
                "duration_s": self.duration,
                "interval_s": self.interval,
                "output_len": self.output_len,
                "prompts": self.prompts.describe(),
            }
        )
        finished: list[RequestTimeline] = []
        start = time.perf_counter()
        stop_at = start + self.duration
        counter = 0
        limits = httpx.Limits(max_connections=self.concurrency + 2)
        async with httpx.AsyncClient(
            headers=self.driver.headers, timeout=self.driver.timeout, limits=limits
        ) as client:

            async def worker() -> None:
                nonlocal counter
                while time.perf_counter() < stop_at:
                    counter += 1
                    prompt = self.prompts.make(1, round=counter)[0]
                    timeline = RequestTimeline(len(prompt), time.perf_counter())
                    body = {
                        "model": model,
                        "prompt": prompt,
                        "max_tokens": self.output_len,
                        "temperature": 0.0,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    await self.driver.stream(client, body, timeline)
                    finished.append(timeline)

            async def watcher() -> None:
                next_at = start + self.interval
                while next_at <= stop_at + 1e-6:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    done = finished[:]
                    finished.clear()
                    metrics = await client.get(f"{self.driver.base_url}/metrics")
                    text = metrics.text
                    ok = [t for t in done if t.ok]
                    report.errors += [t.error for t in done if t.error]
                    sample = SoakSample(
                        t=time.perf_counter() - start,
                        rss_mib=scrape(text, "process_resident_memory_bytes") / 2**20,
                        kv_blocks_in_use=scrape(text, "llm_core_kv_cache_blocks_in_use"),
                        completed=len(ok),
                        errors=len(done) - len(ok),
                        ttft_ms=LatencySummary.of((t.ttft for t in ok), 1e3).as_dict(),
                        tpot_ms=LatencySummary.of(
                            (t.tpot for t in ok if t.tpot is not None), 1e3
                        ).as_dict(),
                    )
                    report.samples.append(sample)
                    if progress is not None:
                        progress(sample)
                    next_at += self.interval

            await asyncio.gather(watcher(), *(worker() for _ in range(self.concurrency)))
        return report


def write_plot(report: SoakReport, path: str | pathlib.Path) -> None:
    """Resident memory, KV blocks in use and latency percentiles over time."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t / 60 for s in report.samples]
    fig, (ax_mem, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_mem.plot(minutes, [s.rss_mib for s in report.samples], "-o", label="server RSS (MiB)")
    ax_mem.set_xlabel("minutes")
    ax_mem.set_ylabel("MiB")
    ax_kv = ax_mem.twinx()
    ax_kv.plot(minutes, [s.kv_blocks_in_use for s in report.samples], "--", color="grey")
    ax_kv.set_ylabel("KV blocks in use (dashed)")
    ax_mem.legend(loc="upper left")
    for key, style in (("ttft_ms", "-"), ("tpot_ms", ":")):
        for stat in ("median", "p99"):
            ys = [getattr(s, key)[stat] for s in report.samples]
            ax_lat.plot(minutes, ys, style, label=f"{key[:4].upper()} {stat}")
    ax_lat.set_xlabel("minutes")
    ax_lat.set_ylabel("ms")
    ax_lat.set_yscale("log")
    ax_lat.legend()
    fig.suptitle(f"llm-core bench soak: {report.config['concurrency']} streams")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: SoakReport, path: str | pathlib.Path, warmup: int, flat_mib: float) -> None:
    pathlib.Path(path).write_text(
        json.dumps(report.as_dict(warmup, flat_mib), indent=2, default=str) + "\n"
    )
