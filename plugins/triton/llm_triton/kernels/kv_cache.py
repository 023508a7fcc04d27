"""KV-cache write: each new token's keys and values go to its slot of the paged cache.

One program per token copies the token's ``Hkv * D`` keys and values, converting to the
cache's dtype (fp8 included); slot -1 (a padding token) writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_triton.kernels.config import KernelConfig, next_power_of_2


@triton.jit
def reshape_and_cache_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    row_size,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    limit = tl.where(slot >= 0, row_size, 0)  # a padding token (slot -1) writes nothing
    for c0 in range(0, row_size, BLOCK):
        c = c0 + cols
        m = c < limit
        k = tl.load(k_ptr + t * stride_kt + c, mask=m, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + c, mask=m, other=0.0)
        tl.store(kc_ptr + slot * row_size + c, k.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(vc_ptr + slot * row_size + c, v.to(vc_ptr.dtype.element_ty), mask=m)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    config: KernelConfig,
) -> None:
    """key, value: (T, Hkv*D), contiguous last dimension; caches contiguous
    (num_blocks, block_size, Hkv, D); slot_mapping: (T,) int64 on the device."""
    tokens = key.shape[0]
    if tokens == 0:
        return
    row = key_cache.shape[2] * key_cache.shape[3]
    block = min(next_power_of_2(row), config.elementwise_block)
    reshape_and_cache_kernel[(tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        row,
        BLOCK=block,
        num_warps=config.elementwise_num_warps,
    )
