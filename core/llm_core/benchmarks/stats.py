"""LatencySummary: the summary statistics every benchmark figure is reported with."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

#: Percentiles reported beside mean and median (vLLM's bench reports p99 by default).
PERCENTILES = (90, 99)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Mean, median, p90, p99, min, max and standard deviation of samples, in milliseconds
    (latencies) or in the samples' own unit; all zero with ``count == 0``."""

    count: int
    mean: float
    median: float
    p90: float
    p99: float
    min: float
    max: float
    std: float

    @classmethod
    def of(cls, samples: Iterable[float], scale: float = 1.0) -> LatencySummary:
        """Summarize ``samples`` multiplied by ``scale`` (1000 turns seconds into ms)."""
        x = np.asarray(list(samples), dtype=np.float64) * scale
        if x.size == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        p90, p99 = np.percentile(x, PERCENTILES)
        return cls(
            count=int(x.size),
            mean=float(x.mean()),
            median=float(np.median(x)),
            p90=float(p90),
            p99=float(p99),
            min=float(x.min()),
            max=float(x.max()),
            std=float(x.std()),
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def median_of(values: Iterable[float]) -> float:
    """The median of repeated measurements of one figure (0.0 for none)."""
    x = list(values)
    return float(np.median(x)) if x else 0.0
