"""What the diff keeps of one HAL call: where it ran, digests and statistics of its tensors, and
how its outputs compare with the reference given the same inputs. Bounded: no tensor is kept,
only a fixed-size sketch of each output, enough to estimate how far two streams drifted.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from llm_hal import DType
from llm_hal.dtypes import from_torch

from llm_conformance.compare import compare
from llm_conformance.tolerances import ATTENTION_KV_SCALE, EXACT, Tolerance, tolerance

#: Length of an output's sketch (a count sketch: each element added, with a sign, to one of
#: SKETCH buckets chosen by a hash of its index). ``|sketch(a) - sketch(b)|^2`` estimates
#: ``|a - b|^2`` within a few percent, so two streams' drift is estimated without keeping
#: either's tensors. Outputs of at most SKETCH elements are kept whole (exact).
SKETCH = 256


@dataclass(slots=True)
class TensorSummary:
    """One tensor of a call: shape, dtype, a digest of its bytes, and statistics."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    digest: str
    stats: dict[str, float] = field(default_factory=dict)
    sketch: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls, name: str, t: torch.Tensor, *, stats: bool = True, sketched: bool = True
    ) -> TensorSummary:
        """Digest and shape, with ``stats`` the statistics, with ``sketched`` the sketch."""
        summary = cls(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), digest(t))
        if stats:
            summary.stats = statistics(t)
        if stats and sketched:
            summary.sketch = sketch(t)
        return summary

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "digest": self.digest,
        }
        if self.stats:
            out["stats"] = self.stats
        return out


@dataclass(slots=True)
class Comparison:
    """Outputs of one side against the float64 reference, given the same inputs."""

    passed: bool
    nmse: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = ""  # the output with the largest error
    worst_index: tuple[int, ...] | None = None  # where in it
    failures: list[str] = field(default_factory=list)
    tolerance: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "passed": self.passed,
            "nmse": _finite(self.nmse),
            "max_abs": _finite(self.max_abs),
            "max_rel": _finite(self.max_rel),
            "tolerance": self.tolerance,
        }
        if self.worst:
            out["worst_output"] = self.worst
            out["worst_index"] = list(self.worst_index or ())
        if self.failures:
            out["failures"] = self.failures
        return out


@dataclass(slots=True)
class CallRecord:
    """One recorded call. ``where`` is ``load``, ``embedding``, ``layer N``, ``head`` or
    ``sampling``; ``step`` counts forward passes from 0 (the prefill), None while loading."""

    index: int
    op: str
    where: str
    step: int | None
    layer: int | None
    occurrence: int  # the n-th call of this op in this step and place
    inputs: list[TensorSummary] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)
    outputs: list[TensorSummary] = field(default_factory=list)
    reference: Comparison | None = None  # this side against the reference, equal inputs
    against: Comparison | None = None  # the other backend on these inputs against the reference
    pair: dict[str, float] = field(default_factory=dict)  # this side against the other backend
    error: str = ""  # what the call itself raised
    rerun_error: str = ""  # what rerunning it on the reference or the other backend raised

    @property
    def key(self) -> tuple[Any, ...]:
        """What aligns the calls of two streams: the same op, at the same place and step."""
        return (self.step, self.where, self.op, self.occurrence)

    @property
    def diverged(self) -> bool:
        """One side's output is beyond the op's tolerance of the reference on equal inputs."""
        return bool(
            (self.reference and not self.reference.passed)
            or (self.against and not self.against.passed)
        )

    def output(self, name: str) -> TensorSummary | None:
        return next((o for o in self.outputs if o.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "op": self.op,
            "where": self.where,
            "step": self.step,
            "layer": self.layer,
            "occurrence": self.occurrence,
            "inputs": [i.as_dict() for i in self.inputs],
            "attributes": self.attributes,
            "outputs": [o.as_dict() for o in self.outputs],
        }
        if self.reference is not None:
            out["vs_reference"] = self.reference.as_dict()
        if self.against is not None:
            out["against_vs_reference"] = self.against.as_dict()
        if self.pair:
            out["vs_against"] = {k: _finite(v) for k, v in self.pair.items()}
        if self.error:
            out["error"] = self.error
        if self.rerun_error:
            out["rerun_error"] = self.rerun_error
        return out


def digest(t: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a host tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def statistics(t: torch.Tensor) -> dict[str, float]:
    """min, max, mean, rms, absmax of the finite elements, and the NaN and Inf counts
    (sums accumulated in float64, without a float64 copy: weights are large)."""
    x = t.detach().flatten()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float64 if not x.is_floating_point() else torch.float32)
    ok = torch.isfinite(x)
    finite = x if bool(ok.all()) else x[ok]
    nan = 0 if finite is x else int(torch.isnan(x).sum())
    stats = {"nan": float(nan), "inf": float(x.numel() - finite.numel() - nan)}
    n = finite.numel()
    if n:
        low, high = (float(v) for v in torch.aminmax(finite))
        norm = float(torch.linalg.vector_norm(finite, dtype=torch.float64))
        stats |= {
            "min": low,
            "max": high,
            "mean": float(finite.sum(dtype=torch.float64)) / n,
            "rms": norm / math.sqrt(n),
            "absmax": max(abs(low), abs(high)),
        }
    return stats


def sketch(t: torch.Tensor) -> torch.Tensor:
    """The count sketch of a tensor (see :data:`SKETCH`); the same hash on every side."""
    x = t.detach().to(torch.float64).flatten()
    if x.numel() <= SKETCH:
        return x.clone()
    h = torch.arange(x.numel(), dtype=torch.int64) * -7046029254386353131  # Fibonacci hashing
    bucket = (h >> 40) & (SKETCH - 1)
    sign = ((h >> 33) & 1).to(torch.float64) * 2 - 1
    return torch.zeros(SKETCH, dtype=torch.float64).index_add_(0, bucket, x * sign)


def drift(a: TensorSummary, b: TensorSummary) -> float:
    """Estimated NMSE of ``a`` against ``b`` (0 when bit-identical, inf when not comparable)."""
    if a.digest == b.digest:
        return 0.0
    if a.shape != b.shape or a.sketch is None or b.sketch is None:
        return math.inf
    diff = float((a.sketch - b.sketch).pow(2).sum())
    signal = float(b.sketch.pow(2).sum())
    if not math.isfinite(diff) or not math.isfinite(signal):
        return math.inf
    return diff / signal if signal > 0 else (0.0 if diff == 0 else math.inf)


def output_tolerance(op: str, output: str, op_class: str, dtype: torch.dtype) -> Tolerance:
    """The tolerance one output of ``op`` is held to: the op's class in the output's dtype;
    integer outputs (ids, ranks) exactly; rms_norm's residual sum as an elementwise add."""
    if not dtype.is_floating_point:
        return EXACT
    if op == "rms_norm" and output == "residual":
        op_class = "elementwise"
    try:
        return tolerance(op_class, from_torch(dtype))
    except (KeyError, ValueError):
        return tolerance(op_class, DType.FP32)


def compare_outputs(
    op: str,
    op_class: str,
    got: list[tuple[str, torch.Tensor]],
    want: list[tuple[str, torch.Tensor]],
    kv_len: int = 0,
) -> Comparison:
    """Every output of one side against the reference's (float64) answer, under the op's
    tolerance: the checks of the operator level (NaN/Inf parity, elementwise bound, NMSE cap,
    rounding bias, bit-exactness for exact classes)."""
    wanted = dict(want)
    result = Comparison(passed=True)
    tolerances = []
    worst_score = (False, -1.0)  # failing outputs first, then the largest NMSE
    for name, g in got:
        w = wanted.get(name)
        if w is None:
            result.passed = False
            result.failures.append(f"{name}: the reference has no such output")
            continue
        tol = output_tolerance(op, name, op_class, g.dtype)
        tolerances.append(f"{name}: {tol.describe()}")
        if tol.exact and g.is_floating_point():
            w = w.to(g.dtype)  # exact classes: the contract's result is representable
        if identical(g, w):
            continue  # nothing to measure (and weights are large: skip the float64 passes)
        cap = None
        if op_class == "attention" and not tol.exact:
            cap = tol.nmse * max(1.0, kv_len / ATTENTION_KV_SCALE)
            tolerances[-1] += f" (NMSE cap {cap:g} at {kv_len} keys)"
        dtype = from_torch(g.dtype) if g.is_floating_point() else DType.FP32
        check = compare(name, g, w, tol, dtype, nmse_cap=cap)
        nmse, max_abs, max_rel, index = error_metrics(g, w)
        if not check.passed:
            result.passed = False
            result.failures.append(str(check))
        score = (not check.passed, nmse)
        if score > worst_score:
            worst_score = score
            result.worst, result.worst_index = name, index
        result.nmse = max(result.nmse, nmse)
        result.max_abs = max(result.max_abs, max_abs)
        result.max_rel = max(result.max_rel, max_rel)
    missing = [name for name, _ in want if name not in dict(got)]
    if missing:
        result.passed = False
        result.failures.append(f"outputs missing: {', '.join(missing)}")
    result.tolerance = "; ".join(tolerances)
    return result


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(
            a.detach().contiguous().view(-1).view(torch.uint8),
            b.detach().contiguous().view(-1).view(torch.uint8),
        )
    )


def error_metrics(
    got: torch.Tensor, want: torch.Tensor
) -> tuple[float, float, float, tuple[int, ...] | None]:
    """NMSE, max absolute error, max relative error (over the elements whose reference
    magnitude is at least 1e-3 of the largest) and the index of the largest error. A NaN or
    Inf that is not matched counts as an infinite error there."""
    if tuple(got.shape) != tuple(want.shape):
        return math.inf, math.inf, math.inf, None
    x, g = got.detach().to(torch.float64), want.detach().to(torch.float64)
    if x.numel() == 0:
        return 0.0, 0.0, 0.0, None
    both = torch.isfinite(x) & torch.isfinite(g)
    same = (x == g) | (torch.isnan(x) & torch.isnan(g))
    diff = torch.where(both, (x - g).abs(), torch.where(same, 0.0, math.inf))
    ref = torch.where(both, g, 0.0)
    signal = float(ref.pow(2).sum())
    err = float(torch.where(both, diff, 0.0).pow(2).sum())
    nmse = err / signal if signal > 0 else err
    if not bool(torch.all(both | same)):
        nmse = math.inf
    flat = diff.flatten()
    worst = int(flat.argmax())
    scale = float(ref.abs().max())
    significant = ref.abs().flatten() >= 1e-3 * scale if scale > 0 else torch.zeros_like(flat) > 0
    max_rel = (
        float((flat[significant] / ref.abs().flatten()[significant]).max())
        if bool(significant.any())
        else (0.0 if float(flat.max()) == 0 else math.inf)
    )
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), x.shape))
    return nmse, float(flat.max()), max_rel, index


def _finite(value: float) -> float | str:
    """JSON has no infinities: they are written as strings."""
    return value if math.isfinite(value) else str(value)
