"""Rotary position embedding of q and k in place, neox or GPT-J pairing, partial rotary dims.

One program per token rotates all its query and key heads; cos/sin are read once per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_triton.kernels.config import KernelConfig, next_power_of_2


@triton.jit
def _rotate_heads(
    base, n_heads, head_size, first, second, pair_mask, cos, sin, BLOCK_H: tl.constexpr
):
    heads = tl.arange(0, BLOCK_H)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + heads
        m = (h < n_heads)[:, None] & pair_mask[None, :]
        row = base + h[:, None] * head_size
        a = tl.load(row + first[None, :], mask=m, other=0.0)
        b = tl.load(row + second[None, :], mask=m, other=0.0)
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        a2 = af * cos[None, :] - bf * sin[None, :]
        b2 = bf * cos[None, :] + af * sin[None, :]
        tl.store(row + first[None, :], a2.to(a.dtype), mask=m)
        tl.store(row + second[None, :], b2.to(b.dtype), mask=m)


@triton.jit
def rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cs_ptr,
    stride_qt,
    stride_kt,
    stride_cs,
    num_q_heads,
    num_kv_heads,
    head_size,
    half_rot,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_R)
    pair_mask = i < half_rot
    cos = tl.load(cs_ptr + pos * stride_cs + i, mask=pair_mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + half_rot + i, mask=pair_mask, other=0.0).to(tl.float32)
    if IS_NEOX:
        first = i
        second = i + half_rot
    else:
        first = 2 * i
        second = 2 * i + 1
    _rotate_heads(
        q_ptr + t * stride_qt, num_q_heads, head_size, first, second, pair_mask, cos, sin, BLOCK_H
    )
    _rotate_heads(
        k_ptr + t * stride_kt, num_kv_heads, head_size, first, second, pair_mask, cos, sin, BLOCK_H
    )


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox_style: bool,
    config: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The HAL's ``rotary_embedding``: q (T, Hq*D), k (T, Hkv*D) rotated in place."""
    tokens = q.shape[0]
    if tokens == 0:
        return q, k
    rot = cos_sin_cache.shape[-1]
    hq, hkv = q.shape[1] // head_size, k.shape[1] // head_size
    block_r = next_power_of_2(rot // 2)
    block_h = max(1, min(next_power_of_2(max(hq, hkv)), max(1, 4096 // block_r)))
    rotary_kernel[(tokens,)](
        positions,
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        k.stride(0),
        cos_sin_cache.stride(0),
        hq,
        hkv,
        head_size,
        rot // 2,
        IS_NEOX=is_neox_style,
        BLOCK_H=block_h,
        BLOCK_R=block_r,
        num_warps=config.elementwise_num_warps,
    )
    return q, k
