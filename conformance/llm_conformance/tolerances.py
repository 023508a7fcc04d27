"""The suite's tolerances, versioned with it: the op-level table, the model-level gates, and
the waivers that relax them.

The op-level table (operator class x dtype -> elementwise bound and NMSE cap, the NMSE floor,
the rounding-bias cap, the sampling distance) is defined in :mod:`llm_hal.tolerances`, because
it is part of the HAL's contract and a plugin's own self-check reads it too (plugins import
``llm_hal`` only). It is re-exported here unchanged: this module is where the suite's version
and its numbers meet. ``SUITE_VERSION`` changes whenever one of them does, here or in
``llm_hal.tolerances`` (tests/test_conformance.py fails until it does), so a certificate always
says which table it was earned under; certificates also print the whole table.

A waiver relaxes one class for one backend (and optionally one op and dtype); it has a name and
a reason, and every report prints it. None is granted in this version.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_hal import DType
from llm_hal.tolerances import (
    ATTENTION_KV_SCALE,
    BIAS_CAP,
    BIAS_MIN_ELEMENTS,
    BIAS_Z,
    EXACT,
    NMSE_FLOOR,
    SAMPLING_DRAWS,
    SAMPLING_TV_MAX,
    TOLERANCES,
    UNIT_ROUNDOFF,
    Tolerance,
    tolerance,
)

__all__ = [
    "ATTENTION_KV_SCALE",
    "BIAS_CAP",
    "BIAS_MIN_ELEMENTS",
    "BIAS_Z",
    "EXACT",
    "GREEDY_TOKENS",
    "GREEDY_TOP_K",
    "MODEL_THRESHOLDS",
    "NMSE_FLOOR",
    "NOISE_FACTOR",
    "NOISE_TOP1_SLACK",
    "SAMPLING_DRAWS",
    "SAMPLING_TV_MAX",
    "SUITE_VERSION",
    "TOLERANCES",
    "UNIT_ROUNDOFF",
    "WAIVERS",
    "ModelThresholds",
    "Tolerance",
    "Waiver",
    "effective_thresholds",
    "table_as_dict",
    "tolerance",
]

#: Bumped whenever a tolerance (here or in llm_hal.tolerances), a threshold, a case list or a
#: check changes.
SUITE_VERSION = "1.5.0"  # 1.1.0: apply_token_bitmask (HAL 1.2); 1.2.0: large-score
# attention, sampling-support and mutation-driven cases; 1.3.0: gemma_rms_norm, scale and
# soft_cap (HAL 1.3); 1.4.0: the rounding-bias check asks for significance (BIAS_Z), the
# near-tie margin follows the reference's own log-probability noise; 1.5.0: the
# speculative_decoding engine audit (a check added; the tables are unchanged)

FP32, FP16, BF16 = DType.FP32, DType.FP16, DType.BF16


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
#: against transformers in fp32), the top-1 gate to the reference's own rate minus
#: NOISE_TOP1_SLACK, and the near-tie margin to NOISE_FACTOR times the reference's largest
#: top-5 log-probability error. Small models in bf16 are noisier than the 8B models the
#: published gates were calibrated on; a wrong kernel still lands orders of magnitude beyond
#: either bound.
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
        # Two tokens may swap when closer than twice the log-probability error that the
        # reference itself makes in this dtype (its worst over the top 5, not its mean).
        tie_margin=max(gates.tie_margin, NOISE_FACTOR * noise["logprob_diff_max"]),
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
