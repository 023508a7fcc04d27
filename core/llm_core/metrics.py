"""EngineMetrics: the Prometheus figures of a serving engine, in a registry of its own.

The engine thread records them (it is the only thread that may read the engine); the HTTP
server renders them for ``GET /metrics``. Names follow Prometheus conventions with the
``llm_core_`` prefix; docs/server.md maps each to the vLLM metric it corresponds to.

The speculative-decoding counters (``llm_core_spec_decode_*``) are exposed only by an engine
with a ``speculative_config``, as vLLM exposes its ``vllm:spec_decode_*`` only then: a series
that is absent means speculation is off, never "no proposal yet".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llm_hal import FallbackBackend
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llm_core.engine.llm_engine import LLMEngine
    from llm_core.outputs import RequestOutput

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 20.0)  # fmt: skip
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _SpecState:
    """The engine's speculative-decoding counters (``engine.spec_stats``) at the snapshot."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _EngineState:
    """What the engine looked like after its last iteration (read at scrape time)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_in_use: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    backend: str = ""
    fallback_backend: str = ""
    fallback_calls: dict[str, int] = field(default_factory=dict)
    spec: _SpecState | None = None  # None: speculative decoding is off


@dataclass(slots=True)
class _Progress:
    tokens: int
    last_token_time: float


class EngineMetrics:
    """Request, latency, token and KV-cache metrics of one served model.

    Thread rules: :meth:`observe_outputs`, :meth:`observe_abort` and
    :meth:`update_engine_state` are called by the engine thread only; :meth:`set_pending`,
    :meth:`observe_rejected` and :meth:`render` from anywhere.
    """

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        reg, name = self.registry, ["model_name"]
        if registry is None:
            # The server process's own figures (resident memory, CPU seconds, open files), as
            # Prometheus servers export them: what ``llm-core bench soak`` watches.
            ProcessCollector(registry=reg)
        self._ttft = Histogram(
            "llm_core_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            name, buckets=_TTFT_BUCKETS, registry=reg,
        ).labels(model_name)  # fmt: skip
        self._itl = Histogram(
            "llm_core_inter_token_latency_seconds",
            "Time between two engine steps that each gave a request new tokens.",
            name, buckets=_ITL_BUCKETS, registry=reg,
        ).labels(model_name)  # fmt: skip
        self._e2e = Histogram(
            "llm_core_e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            name, buckets=_E2E_BUCKETS, registry=reg,
        ).labels(model_name)  # fmt: skip
        self._prompt_tokens = Counter(
            "llm_core_prompt_tokens", "Prompt tokens prefilled (cached ones included).",
            name, registry=reg,
        ).labels(model_name)  # fmt: skip
        self._generation_tokens = Counter(
            "llm_core_generation_tokens", "Tokens generated.", name, registry=reg
        ).labels(model_name)
        self._finished = Counter(
            "llm_core_request_success",
            "Requests finished, by reason: stop, length, or abort (client gone or shutdown).",
            [*name, "finished_reason"], registry=reg,
        )  # fmt: skip
        self._rejected = Counter(
            "llm_core_requests_rejected",
            "Requests refused before queueing (reason=overloaded: 503, queue full).",
            [*name, "reason"], registry=reg,
        )  # fmt: skip
        self._pending = Gauge(
            "llm_core_server_requests_in_flight",
            "Requests accepted by the server and not yet finished (queued or running).",
            name, registry=reg,
        ).labels(model_name)  # fmt: skip
        for reason in ("stop", "length", "abort"):
            self._finished.labels(model_name, reason)
        self._rejected.labels(model_name, "overloaded")
        self._state = _EngineState()
        self._progress: dict[str, _Progress] = {}
        reg.register(_StateCollector(self))

    # ---- engine thread ---------------------------------------------------------------------

    def observe_outputs(self, outputs: list[RequestOutput]) -> None:
        """Record one engine step's outputs (latencies and token counts)."""
        now = time.time()
        for out in outputs:
            num_tokens = sum(len(c.token_ids) for c in out.outputs)
            progress = self._progress.get(out.request_id)
            m = out.metrics
            arrival = m.arrival_time if m is not None else now
            last = m.last_token_time if m is not None and m.last_token_time else now
            if progress is None:
                if num_tokens:
                    first = m.first_token_time if m is not None and m.first_token_time else now
                    self._ttft.observe(max(0.0, first - arrival))
                    self._prompt_tokens.inc(len(out.prompt_token_ids))
                progress = _Progress(0, last)
            elif num_tokens > progress.tokens:
                self._itl.observe(max(0.0, last - progress.last_token_time))
            self._generation_tokens.inc(max(0, num_tokens - progress.tokens))
            progress.tokens, progress.last_token_time = num_tokens, last
            if out.finished:
                self._progress.pop(out.request_id, None)
                end = m.finished_time if m is not None and m.finished_time else now
                self._e2e.observe(max(0.0, end - arrival))
                reason = out.outputs[0].finish_reason if out.outputs else None
                self._finished.labels(self.model_name, reason or "stop").inc()
            else:
                self._progress[out.request_id] = progress

    def observe_abort(self, request_id: str) -> None:
        self._progress.pop(request_id, None)
        self._finished.labels(self.model_name, "abort").inc()

    def update_engine_state(self, engine: LLMEngine) -> None:
        """Snapshot the scheduler, KV cache, fallback and speculative-decoding counters."""
        bm = engine.block_manager
        backend = engine.backend
        fallback_name, calls = "", {}
        if isinstance(backend, FallbackBackend):
            fallback_name = backend.fallback.name
            calls = dict(backend.counts)
            primary = backend.primary.name
        else:
            primary = backend.name
        self._state = _EngineState(
            running=engine.scheduler.num_running,
            waiting=engine.scheduler.num_waiting,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_in_use=bm.num_blocks - bm.num_available_blocks,
            kv_usage=bm.usage,
            prefix_queries=bm.prefix_cache_queries,
            prefix_hits=bm.prefix_cache_hits,
            backend=primary,
            fallback_backend=fallback_name,
            fallback_calls=calls,
            spec=_spec_state(engine),
        )

    # ---- any thread ------------------------------------------------------------------------

    def set_pending(self, count: int) -> None:
        self._pending.set(count)

    def observe_rejected(self, reason: str = "overloaded") -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def state_metrics(self) -> Iterator[Metric]:
        s, name = self._state, [self.model_name]
        gauges = (
            ("llm_core_num_requests_running", "Sequences in the running batch.", s.running),
            ("llm_core_num_requests_waiting", "Sequences waiting to be scheduled.", s.waiting),
            (
                "llm_core_kv_cache_usage_ratio",
                "Fraction of KV-cache blocks in use (0 to 1).",
                s.kv_usage,
            ),
            ("llm_core_kv_cache_blocks_total", "KV-cache blocks.", s.kv_blocks_total),
            (
                "llm_core_kv_cache_blocks_in_use",
                "KV-cache blocks held by at least one sequence.",
                s.kv_blocks_in_use,
            ),
        )
        for metric_name, doc, value in gauges:
            family = GaugeMetricFamily(metric_name, doc, labels=["model_name"])
            family.add_metric(name, float(value))
            yield family
        counters = (
            (
                "llm_core_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_queries,
            ),
            (
                "llm_core_prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_hits,
            ),
        )
        yield from _counters(self.model_name, counters)
        total = CounterMetricFamily(
            "llm_core_backend_fallback_calls",
            "Operator calls the backend could not run, run on the fallback backend instead "
            "(0 unless a fallback backend is configured).",
            labels=["model_name", "backend", "fallback_backend"],
        )
        total.add_metric(
            [self.model_name, s.backend, s.fallback_backend], float(sum(s.fallback_calls.values()))
        )
        yield total
        per_op = CounterMetricFamily(
            "llm_core_backend_fallback_op_calls",
            "Fallen-back operator calls, per operator.",
            labels=["model_name", "backend", "fallback_backend", "op"],
        )
        for op, count in sorted(s.fallback_calls.items()):
            per_op.add_metric([self.model_name, s.backend, s.fallback_backend, op], float(count))
        yield per_op
        if s.spec is not None:
            yield from _spec_metrics(self.model_name, s.spec)


def _spec_state(engine: LLMEngine) -> _SpecState | None:
    if engine.speculative_config is None:
        return None
    stats = engine.spec_stats
    return _SpecState(
        stats.num_drafts,
        stats.num_draft_tokens,
        stats.num_accepted_tokens,
        tuple(stats.accepted_per_pos),
    )


def _counters(
    model_name: str, rows: tuple[tuple[str, str, float], ...]
) -> Iterator[CounterMetricFamily]:
    """One counter family per ``(name, help, value)``, labelled with the model's name."""
    for metric_name, doc, value in rows:
        counter = CounterMetricFamily(metric_name, doc, labels=["model_name"])
        counter.add_metric([model_name], float(value))
        yield counter


def _spec_metrics(model_name: str, spec: _SpecState) -> Iterator[Metric]:
    """vLLM's ``vllm:spec_decode_*`` counters under the ``llm_core_`` prefix."""
    counters = (
        (
            "llm_core_spec_decode_num_drafts",
            "Speculative verifications: decode steps of a sequence that had proposals.",
            spec.num_drafts,
        ),
        (
            "llm_core_spec_decode_num_draft_tokens",
            "Proposed tokens verified by the target model.",
            spec.num_draft_tokens,
        ),
        (
            "llm_core_spec_decode_num_accepted_tokens",
            "Proposed tokens the target model accepted.",
            spec.num_accepted_tokens,
        ),
    )
    yield from _counters(model_name, counters)
    per_pos = CounterMetricFamily(
        "llm_core_spec_decode_num_accepted_tokens_per_pos",
        "Proposed tokens accepted, per proposal position (0: the first proposal).",
        labels=["model_name", "position"],
    )
    for position, value in enumerate(spec.accepted_per_pos):
        per_pos.add_metric([model_name, str(position)], float(value))
    yield per_pos


class _StateCollector(Collector):
    """Exposes the last engine snapshot at scrape time (no engine call from the scraper)."""

    def __init__(self, owner: EngineMetrics):
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        return self._owner.state_metrics()
