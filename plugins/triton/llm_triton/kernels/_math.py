"""Math helpers shared by the kernels, written with portable Triton primitives only.

``tanh`` is built from ``exp`` so the kernels need neither CUDA's libdevice nor ROCm's
device libraries by name: the same source compiles for sm_xx and gfxNNN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: no overflow for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def gelu(x, APPROXIMATE_TANH: tl.constexpr):
    if APPROXIMATE_TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi)
        y = 0.5 * x * (1.0 + tanh(inner))
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    return y


@triton.jit
def silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def dot(a, b, FP32_DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``FP32_DOT`` multiplies in true fp32 (no TF32): for
    fp32 inputs, and for bf16 inputs under the interpreter (see ``config.fp32_dot``), where
    the upcast is exact because a product of two bf16 values is exact in fp32."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)
