"""One verdict of the conformance matrix: a model x backend x dtype cell, and its states.

A cell is CERTIFIED, FAILED, UNSUPPORTED (the backend lacks an operator the model needs, or the
model refuses the dtype) or NOT RUN (the backend cannot run here); :mod:`llm_conformance.runner`
decides which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_hal import DType

from llm_conformance.tolerances import MODEL_THRESHOLDS

CERTIFIED, CELL_FAILED, CELL_UNSUPPORTED, NOT_RUN = "CERTIFIED", "FAILED", "UNSUPPORTED", "NOT RUN"


@dataclass(slots=True)
class Cell:
    """One model x backend x dtype verdict, with everything it was decided on."""

    model: str
    architecture: str
    kind: str
    backend: str
    dtype: DType
    status: str = NOT_RUN
    reasons: list[str] = field(default_factory=list)
    traced_ops: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    noise: dict[str, Any] = field(default_factory=dict)
    greedy: dict[str, Any] = field(default_factory=dict)
    audits: dict[str, Any] = field(default_factory=dict)
    effective_thresholds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    replay: str = ""
    ran: bool = True  # False for NOT RUN and for a dtype the backend does not compute in

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "kind": self.kind,
            "backend": self.backend,
            "dtype": self.dtype.value,
            "status": self.status,
            "ran": self.ran,
            "reasons": self.reasons,
            "traced_ops": self.traced_ops,
            "metrics": self.metrics,
            "thresholds": MODEL_THRESHOLDS[self.dtype].as_dict()
            if self.dtype in MODEL_THRESHOLDS
            else {},
            "effective_thresholds": self.effective_thresholds,
            "reference_noise": self.noise,
            "greedy": self.greedy,
            "audits": self.audits,
            "seconds": round(self.seconds, 2),
            "replay": self.replay,
        }
