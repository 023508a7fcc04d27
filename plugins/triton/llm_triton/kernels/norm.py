"""Fused residual-add + RMSNorm: one program per row, two passes over the row.

The first pass forms ``s = x + residual`` (rounded to x's dtype, the HAL's convention), stores
it and accumulates the sum of squares in fp32; the second re-reads ``s`` (from cache) and
writes ``y``. Rows of any width work: tiles loop over the columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_triton.kernels.config import KernelConfig, next_power_of_2


@triton.jit
def rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    stride_x,
    stride_r,
    stride_y,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        c = c0 + cols
        m = c < n_cols
        x = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + c, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(res_ptr + row * stride_r + c, x, mask=m)  # s replaces the residual
        xf = x.to(tl.float32)
        sum_sq += xf * xf
    rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
    tl.debug_barrier()  # the second pass reads back what the first one stored
    for c0 in range(0, n_cols, BLOCK):
        c = c0 + cols
        m = c < n_cols
        if HAS_RESIDUAL:
            s = tl.load(res_ptr + row * stride_r + c, mask=m, other=0.0)
        else:
            s = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0)
        normed = (s.to(tl.float32) * rstd).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + c, mask=m, other=0.0)
        y = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(y_ptr + row * stride_y + c, y.to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    out: torch.Tensor | None,
    config: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The HAL's ``rms_norm``; with a residual, ``s`` is written into ``residual``'s storage.

    x, residual, out: (T, H) with a contiguous last dimension; weight: (H,) contiguous.
    """
    rows, cols = x.shape
    y = out if out is not None else torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y, residual
    res = residual if residual is not None else x
    block = min(next_power_of_2(cols), config.elementwise_block * 8)
    rms_norm_kernel[(rows,)](
        x,
        res,
        weight,
        y,
        x.stride(0),
        res.stride(0),
        y.stride(0),
        cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=config.elementwise_num_warps,
    )
    return y, residual
