"""The suite's one tolerance table, versioned with it, and the waivers that relax it.

Every operator belongs to one class; each class has, per dtype, an elementwise bound
``|x - g| <= atol + rtol * |g|`` and a cap on the normalized mean squared error
``NMSE = sum (x - g)^2 / sum g^2``, both against the float64 oracle. A result passes only if
both hold. The numbers come from the public suites of the field (PyTorch, vLLM, vllm-ascend,
llama.cpp; see docs/conformance.md for each source), and ``SUITE_VERSION`` changes whenever one
of them does, so a certificate always says which table it was earned under.

Two additions of ours, both part of the table rather than waivers:

- ``NMSE_FLOOR``: the NMSE caps were set for fp32 outputs. A bf16 or fp16 output is rounded to
  a format with unit roundoff ``u``, so each element is off by up to ``u`` relative however
  right the kernel is; a correctly rounded bf16 output alone has an NMSE near 1e-6. The cap is
  therefore ``max(class cap, u^2)``: ``u^2`` is the NMSE of a result whose every element is
  off by a full unit roundoff, which covers the two or three roundings a contract allows (the
  Llama rms_norm rounds twice) while a wrong kernel still misses it by orders of magnitude.
- ``BIAS_CAP``: rounding to nearest is unbiased, truncation is not. Because truncation stays
  within the elementwise bound and the NMSE floor, a separate check caps the mean signed
  relative error of a low-precision output at ``u / 4`` (over at least ``BIAS_MIN_ELEMENTS``
  elements, where a correct kernel's mean is within a few hundredths of ``u`` of zero).

A waiver relaxes one class for one backend (and optionally one op and dtype); it has a name and
a reason, and every report prints it. None is granted in this version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llm_hal import DType

#: Bumped whenever a tolerance, a threshold, a case list or a check changes.
SUITE_VERSION = "1.0.0"

FP32, FP16, BF16 = DType.FP32, DType.FP16, DType.BF16

#: Unit roundoff of each floating format (half an ulp at 1.0).
UNIT_ROUNDOFF: dict[DType, float] = {
    DType.FP64: 2.0**-53,
    FP32: 2.0**-24,
    FP16: 2.0**-11,
    BF16: 2.0**-8,
}


@dataclass(frozen=True, slots=True)
class Tolerance:
    """One class's bound for one dtype. ``exact`` means bit-identical (and NMSE 0)."""

    rtol: float = 0.0
    atol: float = 0.0
    nmse: float = 0.0
    mean_rel: float | None = None  # cap on mean|x - g| / mean|g| (quantized GEMMs)
    exact: bool = False

    def describe(self) -> str:
        if self.exact:
            return "exact"
        parts = []
        if math.isfinite(self.rtol):
            parts.append(f"rtol {self.rtol:g}, atol {self.atol:g}")
        parts.append(f"NMSE {self.nmse:g}")
        if self.mean_rel is not None:
            parts.append(f"mean rel err {self.mean_rel:g}")
        return ", ".join(parts)


def _per_dtype(fp32: Tolerance, fp16: Tolerance, bf16: Tolerance) -> dict[DType, Tolerance]:
    return {FP32: fp32, FP16: fp16, BF16: bf16, DType.FP64: fp32}


def _same(tol: Tolerance) -> dict[DType, Tolerance]:
    return _per_dtype(tol, tol, tol)


EXACT = Tolerance(exact=True)
_NO_ELEMENTWISE = math.inf

#: Operator class -> dtype of the tested output -> tolerance (facts.md section 1).
TOLERANCES: dict[str, dict[DType, Tolerance]] = {
    "exact": _same(EXACT),
    "elementwise": _per_dtype(
        Tolerance(1.3e-6, 1e-5, 1e-7), Tolerance(1e-3, 1e-3, 1e-7), Tolerance(1.6e-2, 1e-3, 1e-7)
    ),
    "rotary": _per_dtype(
        Tolerance(1.3e-6, 1e-5, 1e-7), Tolerance(1e-3, 1e-3, 1e-7), Tolerance(1.6e-2, 1e-3, 1e-7)
    ),
    "norm": _per_dtype(
        Tolerance(1e-5, 1e-5, 1e-6),
        Tolerance(1.1e-3, 1.1e-3, 1e-6),
        Tolerance(7.9e-3, 7.9e-3, 1e-6),
    ),
    "softmax": _per_dtype(
        Tolerance(1e-5, 1e-6, 1e-6), Tolerance(1e-3, 1e-3, 1e-6), Tolerance(1.6e-2, 1e-3, 1e-6)
    ),
    "linear": _per_dtype(
        Tolerance(1e-4, 1e-5, 5e-4), Tolerance(1e-2, 1e-2, 5e-4), Tolerance(2e-2, 2e-2, 5e-4)
    ),
    "quantized": _same(Tolerance(_NO_ELEMENTWISE, 0.0, 5e-4, mean_rel=0.04)),
    "w8a8": _same(Tolerance(1e-1, 1.0, 5e-4)),
    "attention": _per_dtype(
        Tolerance(1e-4, 1e-4, 5e-4), Tolerance(1e-3, 3e-3, 5e-4), Tolerance(1e-2, 2e-2, 5e-4)
    ),
}

#: Floor of every NMSE cap for outputs of a low-precision dtype: u^2 (see the module docstring).
NMSE_FLOOR: dict[DType, float] = {
    DType.FP64: 0.0,
    FP32: 0.0,
    FP16: UNIT_ROUNDOFF[FP16] ** 2,
    BF16: UNIT_ROUNDOFF[BF16] ** 2,
}

#: Mean signed relative error of a bf16/fp16 output, as a fraction of u (rounding bias check).
BIAS_CAP = 0.25
BIAS_MIN_ELEMENTS = 512

#: The attention NMSE cap grows with the context: 5e-4 * max(1, kv / ATTENTION_KV_SCALE).
ATTENTION_KV_SCALE = 20_000

#: Sampling: total-variation distance between the drawn histogram and the exact filtered
#: distribution, over at least SAMPLING_DRAWS seeded draws.
SAMPLING_TV_MAX = 0.01
SAMPLING_DRAWS = 100_000


def tolerance(op_class: str, dtype: DType) -> Tolerance:
    """The table's entry; the NMSE floor is applied here, so callers never forget it."""
    tol = TOLERANCES[op_class][dtype]
    if tol.exact:
        return tol
    floor = NMSE_FLOOR.get(dtype, 0.0)
    if tol.nmse >= floor:
        return tol
    return Tolerance(tol.rtol, tol.atol, floor, tol.mean_rel)


# -------------------------------------------------------------------------------------------
# model level (facts.md section 2)
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelThresholds:
    """Gates of one model x backend x dtype cell against Hugging Face transformers in fp32.

    ``top1_min`` applies to *decisive* positions: those where the reference prefers its own
    top token over the candidate's by more than ``tie_margin`` logits. Two tokens closer than
    twice the allowed log-probability error may legitimately swap (see docs/conformance.md).
    """

    kld_mean: float
    kld_p999: float
    top1_min: float
    cosine_min: float
    logprob_diff_mean: float  # mean |lp - lp_ref| over the reference's top-5 tokens
    tie_margin: float

    def as_dict(self) -> dict[str, float]:
        return {
            "kld_mean_max": self.kld_mean,
            "kld_p999_max": self.kld_p999,
            "top1_min": self.top1_min,
            "cosine_min": self.cosine_min,
            "logprob_diff_mean_max": self.logprob_diff_mean,
            "tie_margin": self.tie_margin,
        }


_LOW_PRECISION = ModelThresholds(
    kld_mean=1e-3,
    kld_p999=2e-2,
    top1_min=0.99,
    cosine_min=0.999,
    logprob_diff_mean=5e-2,
    tie_margin=2 * 5e-2,
)

#: fp16/bf16: facts.md section 2. fp32 has no published gate; ours is 100x tighter than the
#: low-precision one (fp32 rounding errors are 2^16 times smaller than bf16's), which still
#: leaves room for any reduction order.
MODEL_THRESHOLDS: dict[DType, ModelThresholds] = {
    FP32: ModelThresholds(
        kld_mean=1e-5,
        kld_p999=1e-4,
        top1_min=0.999,
        cosine_min=0.99999,
        logprob_diff_mean=1e-3,
        tie_margin=2e-3,
    ),
    FP16: _LOW_PRECISION,
    BF16: _LOW_PRECISION,
}

#: A gate never demands more than the reference itself achieves in the cell's dtype: each gate
#: is relaxed to NOISE_FACTOR times the reference's own error (transformers in that dtype
#: against transformers in fp32), and the top-1 gate to the reference's own rate minus
#: NOISE_TOP1_SLACK. Small models in bf16 are noisier than the 8B models the published gates
#: were calibrated on; a wrong kernel still lands orders of magnitude beyond either bound.
NOISE_FACTOR = 2.0
NOISE_TOP1_SLACK = 0.01


def effective_thresholds(gates: ModelThresholds, noise: dict[str, float]) -> ModelThresholds:
    """``gates`` relaxed to the reference's own noise (metrics of ``compare_logits``)."""
    return ModelThresholds(
        kld_mean=max(gates.kld_mean, NOISE_FACTOR * noise["kld_mean"]),
        kld_p999=max(gates.kld_p999, NOISE_FACTOR * noise["kld_p999"]),
        top1_min=min(gates.top1_min, noise["top1_decisive"] - NOISE_TOP1_SLACK),
        cosine_min=min(gates.cosine_min, 1.0 - NOISE_FACTOR * (1.0 - noise["cosine_mean"])),
        logprob_diff_mean=max(gates.logprob_diff_mean, NOISE_FACTOR * noise["logprob_diff_mean"]),
        tie_margin=gates.tie_margin,
    )


#: Greedy decoding: tokens generated per prompt; at the first divergence each side's token must
#: be in the other's top GREEDY_TOP_K (vLLM's check_logprobs_close).
GREEDY_TOKENS = 24
GREEDY_TOP_K = 5


# -------------------------------------------------------------------------------------------
# waivers
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Waiver:
    """A named relaxation of one operator class for one backend, printed in every report.

    ``op`` and ``dtype`` narrow it to one operator or dtype (None: all). ``tolerance`` replaces
    the table's entry where the waiver applies.
    """

    name: str
    backend: str
    op_class: str
    tolerance: Tolerance
    reason: str
    op: str | None = None
    dtype: DType | None = None

    def applies(self, backend: str, op: str, op_class: str, dtype: DType) -> bool:
        return (
            self.backend == backend
            and self.op_class == op_class
            and (self.op is None or self.op == op)
            and (self.dtype is None or self.dtype == dtype)
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "backend": self.backend,
            "op_class": self.op_class,
            "op": self.op,
            "dtype": None if self.dtype is None else self.dtype.value,
            "tolerance": self.tolerance.describe(),
            "reason": self.reason,
        }


#: Waivers granted in this suite version. Adding one is a reviewed change to this file.
WAIVERS: tuple[Waiver, ...] = ()


def table_as_dict() -> dict[str, dict[str, str]]:
    """The tolerance table as text, for certificates and reports."""
    return {
        op_class: {d.value: tolerance(op_class, d).describe() for d in (FP32, FP16, BF16)}
        for op_class in TOLERANCES
    }
