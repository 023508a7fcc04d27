"""Gated activations ``act(gate) * up`` over rows ``[gate | up]``, computed in fp32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_triton.kernels._math import gelu, silu
from llm_triton.kernels.config import KernelConfig, next_power_of_2

SILU, GELU, GELU_TANH = 0, 1, 2


@triton.jit
def act_and_mul_kernel(
    x_ptr,
    y_ptr,
    stride_x,
    stride_y,
    n_cols,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < n_cols
    g = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + c, mask=m, other=0.0).to(tl.float32)
    if ACTIVATION == 0:
        a = silu(g)
    elif ACTIVATION == 1:
        a = gelu(g, False)
    else:
        a = gelu(g, True)
    tl.store(y_ptr + row * stride_y + c, (a * u).to(y_ptr.dtype.element_ty), mask=m)


def act_and_mul(
    x: torch.Tensor, activation: int, out: torch.Tensor | None, config: KernelConfig
) -> torch.Tensor:
    """x: (T, 2I) with a contiguous last dimension. Returns (T, I) in x's dtype."""
    rows, width = x.shape
    n = width // 2
    y = out if out is not None else torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return y
    block = min(next_power_of_2(n), config.elementwise_block)
    act_and_mul_kernel[(rows, triton.cdiv(n, block))](
        x,
        y,
        x.stride(0),
        y.stride(0),
        n,
        ACTIVATION=activation,
        BLOCK=block,
        num_warps=config.elementwise_num_warps,
    )
    return y


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None, config: KernelConfig) -> torch.Tensor:
    return act_and_mul(x, SILU, out, config)


def gelu_and_mul(
    x: torch.Tensor, approximate: str, out: torch.Tensor | None, config: KernelConfig
) -> torch.Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', not {approximate!r}")
    return act_and_mul(x, GELU_TANH if approximate == "tanh" else GELU, out, config)
