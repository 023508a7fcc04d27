"""RequestTimeline: when one request arrived and when each of its output tokens appeared.

Every latency figure comes from these timestamps (``time.perf_counter`` seconds):

- TTFT, time to first token: first token - arrival (queueing and prefill included);
- ITL, inter-token latencies: the gaps between consecutive token arrivals;
- TPOT, time per output token: (last token - first token) / (output tokens - 1);
- E2E, end-to-end latency: last token - arrival.

A streaming chunk that carries several tokens records them at one time, as vLLM's bench does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestTimeline:
    prompt_len: int
    arrival: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    def add_tokens(self, count: int, when: float) -> None:
        self.token_times.extend([when] * count)

    @property
    def output_len(self) -> int:
        return len(self.token_times)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        """None for a single-token output (no decode phase to divide)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t) if b > a]
