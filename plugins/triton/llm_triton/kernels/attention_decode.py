"""Paged attention for decode: one query token per sequence, split-K over long contexts.

Grid ``(B, Hkv, S)``: a program takes one KV head with all the query heads that share it
(GQA, padded to a 16-row tile for ``tl.dot``) and one of ``S`` contiguous slices of the
context, and runs an online softmax over it. With ``S > 1`` each program writes its
normalized partial output and log-sum-exp, and a second kernel merges the slices; with
``S == 1`` the first kernel writes the output directly. Keys are read token by token through
the block table, so any block size works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_triton.kernels._math import dot, tanh
from llm_triton.kernels.config import KernelConfig, fp32_dot, next_power_of_2


@triton.jit
def decode_split_kernel(
    q_ptr,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    out_ptr,
    part_out,
    part_lse,
    scale,
    soft_cap,
    window,
    stride_qt,
    stride_ot,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    num_q_heads,
    block_size,
    head_size,
    split_len,
    num_splits,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DIRECT: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    if USE_WINDOW:
        lo = tl.maximum(lo, seq_len - window)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < head_size
    q = tl.load(
        q_ptr + b * stride_qt + heads[:, None] * head_size + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (G, D)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    table = block_tables + b * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + n
        n_mask = pos < hi
        blk = tl.load(table + pos // block_size, mask=n_mask, other=0).to(tl.int64)
        row = blk * stride_cb + (pos % block_size) * stride_cs + kvh * stride_ch
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        k = k.to(q.dtype)
        s = dot(q, tl.trans(k), FP32_DOT) * scale
        if USE_SOFT_CAP:
            s = soft_cap * tanh(s / soft_cap)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        dst = out_ptr + b * stride_ot + heads[:, None] * head_size + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (b * num_q_heads + heads) * num_splits + split  # (G,)
        tl.store(part_out + part[:, None] * head_size + d[None, :], o, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse + part, lse, mask=g_mask)


@triton.jit
def decode_reduce_kernel(
    part_out,
    part_lse,
    out_ptr,
    stride_ot,
    num_q_heads,
    head_size,
    num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < head_size
    base = (b * num_q_heads + h) * num_splits
    lse = tl.load(part_lse + base + s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0)  # empty slices weigh nothing
    o = tl.load(
        part_out + (base + s)[:, None] * head_size + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(
        out_ptr + b * stride_ot + h * head_size + d, res.to(out_ptr.dtype.element_ty), mask=d_mask
    )


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, config: KernelConfig
) -> int:
    """Split the context only when ``B * Hkv`` programs would leave the device idle, into
    slices of at least two key tiles: about two waves of programs in all."""
    tiles = triton.cdiv(max(max_seq_len, 1), config.decode_block_n)
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= config.num_sms or tiles < 4:
        return 1
    want = triton.cdiv(2 * config.num_sms, programs)
    return max(1, min(want, tiles // 2, config.max_splits))


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    out: torch.Tensor | None,
    config: KernelConfig,
    num_splits: int | None = None,
) -> torch.Tensor:
    """query: (B, Hq*D), contiguous last dimension; caches (NB, BS, Hkv, D) with contiguous
    heads; block_tables (B, M) int32; seq_lens (B,) int32, all on the device. ``max_seq_len``
    bounds every ``seq_lens`` entry (it sizes the split). Returns (B, Hq*D) in query's dtype."""
    b = query.shape[0]
    _, block_size, hkv, d = key_cache.shape
    hq = query.shape[1] // d
    group = hq // hkv
    o = out if out is not None else torch.empty((b, hq * d), dtype=query.dtype, device=query.device)
    if b == 0:
        return o
    splits = num_splits or choose_num_splits(b, hkv, max_seq_len, config)
    block_n = config.decode_block_n
    split_len = triton.cdiv(triton.cdiv(max(max_seq_len, 1), splits), block_n) * block_n
    direct = splits == 1
    if direct:
        part_out = part_lse = o  # unused
    else:
        part_out = torch.empty((b, hq, splits, d), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((b, hq, splits), dtype=torch.float32, device=query.device)
    block_d = max(16, next_power_of_2(d))
    decode_split_kernel[(b, hkv, splits)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        o,
        part_out,
        part_lse,
        scale,
        float(logits_soft_cap or 0.0),
        int(sliding_window or 0),
        query.stride(0),
        o.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        hq,
        block_size,
        d,
        split_len,
        splits,
        GROUP=group,
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DIRECT=direct,
        USE_SOFT_CAP=bool(logits_soft_cap),
        USE_WINDOW=bool(sliding_window),
        FP32_DOT=fp32_dot(query.dtype),
        num_warps=config.attention_num_warps,
        num_stages=config.attention_num_stages,
    )
    if not direct:
        decode_reduce_kernel[(b, hq)](
            part_out,
            part_lse,
            o,
            o.stride(0),
            hq,
            d,
            splits,
            BLOCK_S=next_power_of_2(splits),
            BLOCK_D=block_d,
            num_warps=config.elementwise_num_warps,
        )
    return o
