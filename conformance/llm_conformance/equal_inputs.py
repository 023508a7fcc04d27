"""The diff's verdict on one call: rerun it with the candidate's own inputs on the float64
reference (and on the other backend), and hold each output to the op's tolerance.

Comparing the two sides' streams call by call would blame whichever op first shows an error
that came from upstream; given equal inputs, an op is blamed only for what it does itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from llm_hal import Backend, TorchBackend

from llm_conformance.call_record import CallRecord, compare_outputs, error_metrics, identical
from llm_conformance.cases import specs
from llm_conformance.op_call import HostCall, HostMemo, execute, reference_outputs

Outputs = list[tuple[str, torch.Tensor]]


def op_class(op: str) -> str:
    """The tolerance class of a checked call (the operator level's)."""
    spec = specs().get(op)
    return spec.op_class if spec is not None else "exact"


@dataclass(slots=True)
class Rerun:
    """The outputs of one call's reruns, for the caller to keep or drop."""

    reference: Outputs = field(default_factory=list)
    against: Outputs = field(default_factory=list)


class EqualInputsCheck:
    """Reruns calls on ``TorchBackend`` in float64 and, when given, on the ``against`` backend
    in the call's own dtypes. ``memory`` bounds the host and device copies of weights kept
    between calls (per side)."""

    def __init__(self, against: Backend | None = None, memory: int = 1 << 30):
        self.oracle = TorchBackend("cpu")
        self.against = against
        self._oracle_memo = HostMemo(memory)
        self._against_memo = HostMemo(memory)

    def check(self, record: CallRecord, call: HostCall, outputs: Outputs) -> Rerun:
        """Fill ``record.reference`` (and ``record.against``, ``record.pair``)."""
        rerun = Rerun()
        cls = op_class(call.op)
        try:
            rerun.reference = reference_outputs(call, self.oracle, self._oracle_memo)
        except Exception as exc:
            record.rerun_error = f"the reference raised {type(exc).__name__}: {exc}"
            return rerun
        record.reference = compare_outputs(call.op, cls, outputs, rerun.reference, call.kv_len)
        if self.against is None:
            return rerun
        try:
            rerun.against = execute(self.against, call, memo=self._against_memo)
        except Exception as exc:
            record.rerun_error = f"{self.against.name} raised {type(exc).__name__}: {exc}"
            return rerun
        record.against = compare_outputs(call.op, cls, rerun.against, rerun.reference, call.kv_len)
        record.pair = _pair(outputs, rerun.against)
        return rerun


def _pair(ours: Outputs, theirs: Outputs) -> dict[str, float]:
    """NMSE and max abs error of one side's outputs against the other's (both in the call's
    dtype): how far apart the two backends are on the same inputs."""
    other = dict(theirs)
    nmse = max_abs = 0.0
    for name, t in ours:
        if name in other and not identical(t, other[name]):
            n, a, _, _ = error_metrics(t, other[name])
            nmse, max_abs = max(nmse, n), max(max_abs, a)
    return {"nmse": nmse, "max_abs": max_abs}
