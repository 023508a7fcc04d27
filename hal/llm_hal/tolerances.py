"""How close to the reference every operator must be: the op-level tolerance table.

The table is part of the HAL's contract (an operator's semantics include how far from the
float64 reference its result may be), so it lives beside the reference, where every user of it
can read it: the conformance suite, which certifies against it, and a plugin's own numerical
self-check (``python -m llm_triton.selfcheck``), which may import ``llm_hal`` and nothing else
of llm-core. It is versioned with the conformance suite: every change here is a change of
``llm_conformance.tolerances.SUITE_VERSION`` (tests/test_conformance.py pins the two together),
and certificates print the table they were earned under. Look entries up with
:func:`tolerance`, which applies the NMSE floor.

Every operator belongs to one class; each class has, per dtype, an elementwise bound
``|x - g| <= atol + rtol * |g|`` and a cap on the normalized mean squared error
``NMSE = sum (x - g)^2 / sum g^2``, both against the float64 oracle. A result passes only if
both hold. The numbers come from the public suites of the field (PyTorch, vLLM, vllm-ascend,
llama.cpp; see docs/conformance.md for each source).

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
  elements, where a correct kernel's mean is within a few hundredths of ``u`` of zero) when
  the lean is also significant: more than ``BIAS_Z`` standard deviations of what correct
  rounding gives on those magnitudes (each element's error uniform within half its ulp). The
  mean is weighted by magnitude, so a row dominated by a few large elements (Gemma's
  activations reach 800 where most are near 1) has few effective samples; there a correctly
  rounded result can lean 0.3 u by chance, and truncation cannot be told from it either.

Relaxations for one backend (waivers) are the suite's business, not the contract's: they live
in ``llm_conformance.tolerances`` and every report prints them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llm_hal.dtypes import DType

__all__ = [
    "ATTENTION_KV_SCALE",
    "BIAS_CAP",
    "BIAS_MIN_ELEMENTS",
    "BIAS_Z",
    "EXACT",
    "NMSE_FLOOR",
    "SAMPLING_DRAWS",
    "SAMPLING_TV_MAX",
    "TOLERANCES",
    "UNIT_ROUNDOFF",
    "Tolerance",
    "tolerance",
]

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
#: ... and its lean at least this many standard deviations of correct rounding's (a false
#: alarm rate near 6e-5 per check); truncation on 512 spread elements lands near 39.
BIAS_Z = 4.0

#: The attention NMSE cap grows with the context: 5e-4 * max(1, kv / ATTENTION_KV_SCALE).
ATTENTION_KV_SCALE = 20_000

#: Sampling: total-variation distance between the drawn histogram and the exact filtered
#: distribution, over at least SAMPLING_DRAWS seeded draws.
SAMPLING_TV_MAX = 0.01
SAMPLING_DRAWS = 100_000


def tolerance(op_class: str, dtype: DType) -> Tolerance:
    """The table's entry for ``op_class`` (a key of :data:`TOLERANCES`) and the dtype of the
    tested output, with the NMSE floor applied, so callers never forget it. Raises KeyError
    for an unknown class or a dtype the table has no column for."""
    tol = TOLERANCES[op_class][dtype]
    if tol.exact:
        return tol
    floor = NMSE_FLOOR.get(dtype, 0.0)
    if tol.nmse >= floor:
        return tol
    return Tolerance(tol.rtol, tol.atol, floor, tol.mean_rel)
