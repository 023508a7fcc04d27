"""The comparison every operator test uses, with the one tolerance table.

A result passes only if NaN/Inf parity holds and, on the finite elements, the entry of the
conformance suite's table (:func:`llm_hal.tolerances.tolerance`) for its operator class and
dtype holds: bit-exactness, or the elementwise bound ``|x - g| <= atol + rtol * |g|`` AND the
NMSE cap (floored at u^2 for bf16/fp16) AND, for quantized GEMMs, the mean relative error.
"""

from __future__ import annotations

import torch
from llm_hal import DType
from llm_hal.tolerances import tolerance


def assert_close(got: torch.Tensor, want: torch.Tensor, op_class: str, dtype: torch.dtype) -> None:
    """``got`` (in ``dtype``, or any integer type for "exact") against ``want``, the reference
    in float64; ``op_class`` is a class of the table ("exact", "elementwise", "norm", ...)."""
    tol = tolerance(op_class, DType.parse(dtype))
    where = f"{op_class}/{dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    x, g = got.detach().double(), want.detach().double()
    assert torch.equal(torch.isnan(x), torch.isnan(g)), "NaN positions differ"
    assert torch.equal(torch.isinf(x), torch.isinf(g)), "Inf positions differ"
    assert torch.equal(x[torch.isinf(g)], g[torch.isinf(g)]), "Inf signs differ"
    finite = torch.isfinite(g)
    x, g = x[finite], g[finite]
    if tol.exact:
        assert torch.equal(x, g), f"not bit-exact: max |diff| {(x - g).abs().max():.3g}"
        return
    diff = (x - g).abs()
    bound = tol.atol + tol.rtol * g.abs()
    worst = int(torch.argmax(diff - bound)) if diff.numel() else 0
    assert bool(torch.all(diff <= bound)), (
        f"{where}: |x-g| = {diff[worst]:.3g} > {bound[worst]:.3g} "
        f"(x = {x[worst]:.6g}, g = {g[worst]:.6g})"
    )
    signal = float((g * g).sum())
    nmse = float((diff * diff).sum()) / signal if signal else float((diff * diff).sum())
    assert nmse <= tol.nmse, f"{where}: NMSE {nmse:.3g} > {tol.nmse:.3g}"
    if tol.mean_rel is not None:
        mean_rel = float(diff.mean() / g.abs().mean())
        assert mean_rel < tol.mean_rel, f"{where}: mean relative error {mean_rel:.3g}"
