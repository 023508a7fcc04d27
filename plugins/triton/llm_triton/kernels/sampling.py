"""The random draw of sampling: an exponential race over filtered probabilities.

``argmax_v p[v] / E[v]`` with ``E[v] ~ Exp(1)`` i.i.d. draws ``v`` with probability ``p[v]``.
Each row's exponentials come from Philox keyed by that row's seed alone, so a row's token
never depends on the rest of the batch, and one launch replaces a Python loop of per-row
generators. Filtering (temperature, top-k, top-p, min-p) stays in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_triton.kernels.config import KernelConfig, next_power_of_2


@triton.jit
def exponential_race_kernel(
    probs_ptr,
    seeds_ptr,
    out_ptr,
    n_rows,
    vocab,
    stride_p,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < n_rows
    seeds = tl.load(seeds_ptr + rows, mask=r_mask, other=0)
    cols = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_B], -1.0, dtype=tl.float32)
    best_id = tl.zeros([BLOCK_B], dtype=tl.int64)
    for v0 in range(0, vocab, BLOCK_V):
        c = v0 + cols
        m = r_mask[:, None] & (c < vocab)[None, :]
        p = tl.load(
            probs_ptr + rows[:, None].to(tl.int64) * stride_p + c[None, :], mask=m, other=0.0
        ).to(tl.float32)
        bits = tl.randint(seeds[:, None], c[None, :]).to(tl.uint32, bitcast=True)
        # 23 random bits, centred: u in [2^-24, 1 - 2^-24], so -log(u) is finite and > 0.
        u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        score = tl.where(p > 0.0, p / -tl.log(u), -1.0)
        tile_best = tl.max(score, axis=1)
        tile_id = tl.argmax(score, axis=1).to(tl.int64) + v0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_id = tl.where(better, tile_id, best_id)
    tl.store(out_ptr + rows, best_id, mask=r_mask)


def exponential_race(
    probs: torch.Tensor, seeds: torch.Tensor, config: KernelConfig
) -> torch.Tensor:
    """probs: (B, V) float, rows summing to 1 (zeros allowed), contiguous last dimension;
    seeds: (B,) int64 on the device. Returns (B,) int64 token ids."""
    rows, vocab = probs.shape
    out = torch.empty((rows,), dtype=torch.int64, device=probs.device)
    if rows == 0:
        return out
    block_v = min(next_power_of_2(vocab), config.elementwise_block)
    block_b = max(1, min(next_power_of_2(rows), 4096 // block_v))
    exponential_race_kernel[(triton.cdiv(rows, block_b),)](
        probs,
        seeds,
        out,
        rows,
        vocab,
        probs.stride(0),
        BLOCK_B=block_b,
        BLOCK_V=block_v,
        num_warps=config.elementwise_num_warps,
    )
    return out
