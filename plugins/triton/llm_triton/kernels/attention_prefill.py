"""Paged attention for prefill: variable-length, causal, over a cached prefix, GQA.

Grid ``(B, Hq, ceil(max_query_len / BLOCK_M))``: a program takes ``BLOCK_M`` new tokens of
one sequence and one query head and runs an online softmax over the keys they may see,
gathered from the paged cache through the block table (the new tokens' own keys included:
``reshape_and_cache`` runs first). Tiles past a sequence's query length do no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_triton.kernels._math import dot, tanh
from llm_triton.kernels.config import KernelConfig, fp32_dot, next_power_of_2


@triton.jit
def prefill_kernel(
    q_ptr,
    k_cache,
    v_cache,
    block_tables,
    query_start_loc,
    seq_lens,
    out_ptr,
    scale,
    soft_cap,
    window,
    stride_qt,
    stride_ot,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    block_size,
    head_size,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_loc + b).to(tl.int64)
    q_len = (tl.load(query_start_loc + b + 1) - q_start).to(tl.int32)
    seq_len = tl.load(seq_lens + b)
    ctx = seq_len - q_len  # tokens cached before this step's chunk
    kvh = h // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < q_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_size
    q = tl.load(
        q_ptr + (q_start + rows)[:, None] * stride_qt + h * head_size + d[None, :],
        mask=r_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (M, D)
    q_pos = ctx + rows

    # Keys up to the tile's last query (causal); none at all for a tile past the chunk.
    hi = tl.minimum(seq_len, ctx + (tile + 1) * BLOCK_M)
    hi = tl.where(tile * BLOCK_M < q_len, hi, 0)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + tile * BLOCK_M - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    table = block_tables + b * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + n
        n_mask = k_pos < hi
        blk = tl.load(table + k_pos // block_size, mask=n_mask, other=0).to(tl.int64)
        row = blk * stride_cb + (k_pos % block_size) * stride_cs + kvh * stride_ch
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        s = dot(q, tl.trans(k), FP32_DOT) * scale
        if USE_SOFT_CAP:
            s = soft_cap * tanh(s / soft_cap)
        allowed = n_mask[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet (window, padding rows) keeps m = -inf: shift by 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    dst = out_ptr + (q_start + rows)[:, None] * stride_ot + h * head_size + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    out: torch.Tensor | None,
    config: KernelConfig,
) -> torch.Tensor:
    """query: (T, Hq*D), contiguous last dimension; caches (NB, BS, Hkv, D) with contiguous
    heads; block_tables (B, M) int32; query_start_loc (B+1,) and seq_lens (B,) int32 on the
    device. Returns (T, Hq*D) in query's dtype."""
    t = query.shape[0]
    num_seqs = seq_lens.shape[0]
    _, block_size, hkv, d = key_cache.shape
    hq = query.shape[1] // d
    o = out if out is not None else torch.empty((t, hq * d), dtype=query.dtype, device=query.device)
    if t == 0 or num_seqs == 0:
        return o
    block_m = config.prefill_block_m
    grid = (num_seqs, hq, triton.cdiv(max_query_len, block_m))
    prefill_kernel[grid](
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        o,
        scale,
        float(logits_soft_cap or 0.0),
        int(sliding_window or 0),
        query.stride(0),
        o.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        block_size,
        d,
        GROUP=hq // hkv,
        BLOCK_M=block_m,
        BLOCK_N=config.prefill_block_n,
        BLOCK_D=max(16, next_power_of_2(d)),
        USE_SOFT_CAP=bool(logits_soft_cap),
        USE_WINDOW=bool(sliding_window),
        FP32_DOT=fp32_dot(query.dtype),
        num_warps=config.attention_num_warps,
        num_stages=config.attention_num_stages,
    )
    return o
