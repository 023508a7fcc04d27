"""The comparison every operator check uses: a result on the host against the float64 oracle.

Order of the checks: shape, NaN/Inf parity (same positions, same signs of infinities), then on
the finite elements either bit-exactness or the elementwise bound AND the NMSE cap, the mean
relative error for quantized GEMMs, and the rounding-bias cap for bf16/fp16 outputs. The
result is a :class:`Check` that says which of these failed and by how much; nothing raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from llm_hal import DType

from llm_conformance.tolerances import (
    BIAS_CAP,
    BIAS_MIN_ELEMENTS,
    BIAS_Z,
    UNIT_ROUNDOFF,
    Tolerance,
)


@dataclass(slots=True)
class Check:
    """One verdict inside a case: ``name`` says what was checked (``output``, ``guard`` ...)."""

    name: str
    passed: bool
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name}: {verdict}" + (f" ({self.detail})" if self.detail else "")


def compare(
    name: str,
    got: torch.Tensor,
    want: torch.Tensor,
    tol: Tolerance,
    dtype: DType,
    *,
    nmse_cap: float | None = None,
) -> Check:
    """``got`` (a host tensor from the backend) against ``want`` (the oracle, float64).

    ``nmse_cap`` overrides the tolerance's NMSE cap (attention scales it with the context).
    """
    if tuple(got.shape) != tuple(want.shape):
        return Check(name, False, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    x, g = got.detach().to(torch.float64), want.detach().to(torch.float64)
    nan_x, nan_g = torch.isnan(x), torch.isnan(g)
    if not torch.equal(nan_x, nan_g):
        where = torch.nonzero(nan_x != nan_g)[0].tolist()
        return Check(
            name, False, f"NaN parity: at {where} got {_at(x, where)}, want {_at(g, where)}"
        )
    inf_x, inf_g = torch.isinf(x), torch.isinf(g)
    if not torch.equal(inf_x, inf_g) or not torch.equal(x[inf_g], g[inf_g]):
        where = torch.nonzero((inf_x != inf_g) | (inf_g & (x != g)))[0].tolist()
        return Check(
            name, False, f"Inf parity: at {where} got {_at(x, where)}, want {_at(g, where)}"
        )
    finite = torch.isfinite(g)
    xf, gf = x[finite], g[finite]
    if tol.exact:
        if torch.equal(xf, gf):
            return Check(name, True, metrics={"max_abs": 0.0})
        diff = (xf - gf).abs()
        worst = int(diff.argmax())
        return Check(
            name,
            False,
            f"not bit-exact: {int((diff > 0).sum())} of {diff.numel()} elements differ, "
            f"max |x-g| {float(diff[worst]):.3g} "
            f"(x={float(xf[worst]):.6g}, g={float(gf[worst]):.6g})",
            {"max_abs": float(diff.max())},
        )
    return _within(name, xf, gf, tol, dtype, nmse_cap)


def _within(
    name: str,
    x: torch.Tensor,
    g: torch.Tensor,
    tol: Tolerance,
    dtype: DType,
    nmse_cap: float | None,
) -> Check:
    diff = (x - g).abs()
    if diff.numel() == 0:
        return Check(name, True, metrics={"max_abs": 0.0, "nmse": 0.0})
    bound = tol.atol + tol.rtol * g.abs()
    excess = diff - bound
    worst = int(excess.argmax())
    signal = float((g * g).sum())
    err = float((diff * diff).sum())
    nmse = err / signal if signal > 0 else err
    metrics = {"max_abs": float(diff.max()), "nmse": nmse}
    cap = tol.nmse if nmse_cap is None else nmse_cap
    problems = []
    if float(excess[worst]) > 0:
        problems.append(
            f"|x-g| = {float(diff[worst]):.3g} > {float(bound[worst]):.3g} at element {worst} "
            f"(x={float(x[worst]):.6g}, g={float(g[worst]):.6g}); "
            f"{int((excess > 0).sum())} of {diff.numel()} elements out of bounds"
        )
    if nmse > cap:
        problems.append(f"NMSE {nmse:.3g} > {cap:.3g}")
    if tol.mean_rel is not None:
        mean_rel = float(diff.mean() / g.abs().mean().clamp_min(1e-300))
        metrics["mean_rel"] = mean_rel
        if mean_rel >= tol.mean_rel:
            problems.append(f"mean relative error {mean_rel:.3g} >= {tol.mean_rel:g}")
    elif dtype in (DType.BF16, DType.FP16) and diff.numel() >= BIAS_MIN_ELEMENTS:
        u = UNIT_ROUNDOFF[dtype]
        lean = float(((x - g) * g.sign()).sum())
        bias = lean / float(g.abs().sum().clamp_min(1e-300)) / u
        # What correct rounding can lean by chance: each error uniform within half an ulp.
        ulp = u * torch.exp2(torch.frexp(g)[1].to(g.dtype))  # 2u * 2^(e - 1), g = m * 2^e
        spread = float((ulp.pow(2).sum() / 12).sqrt())
        z = lean / spread if spread > 0 else 0.0
        metrics["bias_u"] = bias
        metrics["bias_z"] = z
        if abs(bias) > BIAS_CAP and abs(z) > BIAS_Z:
            direction = "toward zero (truncation?)" if bias < 0 else "away from zero"
            problems.append(
                f"rounding bias {bias:+.3f} u > {BIAS_CAP} u ({z:+.1f} sigma of correct "
                f"rounding): errors lean {direction}"
            )
    return Check(name, not problems, "; ".join(problems), metrics)


def _at(t: torch.Tensor, where: list[int]) -> float:
    return float(t[tuple(where)])


def exact_match(name: str, got: torch.Tensor, want: torch.Tensor) -> Check:
    """Integer results (ids, ranks): identical shape and values."""
    if tuple(got.shape) != tuple(want.shape):
        return Check(name, False, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.to(torch.int64), want.to(torch.int64)
    if torch.equal(g, w):
        return Check(name, True)
    where = torch.nonzero(g != w)[0].tolist()
    return Check(
        name,
        False,
        f"{int((g != w).sum())} of {g.numel()} values differ; first at {where}: "
        f"got {int(g[tuple(where)])}, want {int(w[tuple(where)])}",
    )
