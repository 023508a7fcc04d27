"""Model-level metrics: teacher-forced next-token distributions and greedy decoding, each
against the Hugging Face reference.

Teacher forcing runs the engine's model on the backend for every position of fixed token
sequences at once (one mixed-length prefill step, with the logits of every position), so each
position's next-token distribution is compared with the reference's on the very same context.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from llm_core.models.base import CausalLM, ForwardBatch
from llm_hal import AttentionMetadata, Backend, DType

from llm_conformance.tolerances import GREEDY_TOP_K, ModelThresholds

BLOCK_SIZE = 16


def backend_logits(
    model: CausalLM, backend: Backend, dtype: DType, sequences: list[list[int]]
) -> list[torch.Tensor]:
    """The model's logits at every position of every sequence, in one prefill step on its own
    KV cache; one (L, V) float64 host tensor per sequence."""
    need = [-(-len(s) // BLOCK_SIZE) for s in sequences]
    caches = [
        backend.allocate_kv_cache(sum(need), BLOCK_SIZE, model.num_kv_heads, model.head_size, dtype)
        for _ in range(model.num_layers)
    ]
    tables = np.zeros((len(sequences), max(need)), dtype=np.int64)
    first = 0
    for row, n in enumerate(need):
        tables[row, :n] = np.arange(first, first + n)
        first += n
    positions = np.concatenate([np.arange(len(s)) for s in sequences])
    slots = np.concatenate(
        [
            tables[row, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            for row, pos in enumerate(np.arange(len(s)) for s in sequences)
        ]
    )
    lengths = [len(s) for s in sequences]
    total = sum(lengths)
    meta = AttentionMetadata(
        query_start_loc=np.concatenate([[0], np.cumsum(lengths)]),
        seq_lens=np.array(lengths),
        block_tables=tables,
        slot_mapping=slots,
        block_size=BLOCK_SIZE,
    )
    positions = positions.astype(np.int64)
    device_positions = backend.from_host(positions, DType.INT64)
    # Each sequence is one forward of its whole length, as the reference runs it (LongRoPE).
    rows = model.rope_rows(positions, np.repeat(lengths, lengths).astype(np.int64))
    rope = device_positions if rows is positions else backend.from_host(rows, DType.INT64)
    batch = ForwardBatch(
        input_ids=backend.from_host(np.concatenate(sequences).astype(np.int64), DType.INT64),
        positions=device_positions,
        attn=meta,
        logits_indices=backend.from_host(np.arange(total, dtype=np.int64), DType.INT64),
        rope_positions=rope,
    )
    logits = backend.to_host(model.forward(batch, caches)).to(torch.float64)
    return list(torch.split(logits, lengths, dim=0))


def compare_logits(
    candidate: list[torch.Tensor],
    reference: list[torch.Tensor],
    sequences: list[list[int]],
    gates: ModelThresholds,
) -> dict[str, float]:
    """KL(ref || candidate) statistics, top-1 agreement, logit cosine, top-5 log-probability
    error and the perplexity ratio on the sequences' own next tokens, over every position."""
    cand = torch.cat(candidate)
    ref = torch.cat(reference)
    lp_c = torch.log_softmax(cand, dim=-1)
    lp_r = torch.log_softmax(ref, dim=-1)
    kld = (lp_r.exp() * (lp_r - lp_c)).sum(dim=-1).clamp_min(0.0)
    top_c, top_r = cand.argmax(dim=-1), ref.argmax(dim=-1)
    # How much more the reference prefers its own top token than the candidate's.
    gap = (lp_r.gather(1, top_r[:, None]) - lp_r.gather(1, top_c[:, None]))[:, 0]
    decisive_miss = (top_c != top_r) & (gap > gates.tie_margin)
    top5 = lp_r.topk(5, dim=-1).indices
    lp_diff = (lp_c.gather(1, top5) - lp_r.gather(1, top5)).abs()
    cosine = torch.nn.functional.cosine_similarity(cand, ref, dim=-1)
    rows = torch.tensor(
        [p for s, start in _starts(sequences) for p in range(start, start + len(s) - 1)]
    )
    targets = torch.tensor([t for s in sequences for t in s[1:]])
    nll_c = -lp_c[rows, targets].mean() if len(rows) else torch.tensor(0.0)
    nll_r = -lp_r[rows, targets].mean() if len(rows) else torch.tensor(0.0)
    return {
        "positions": float(cand.shape[0]),
        "kld_mean": float(kld.mean()),
        "kld_p999": float(torch.quantile(kld, 0.999)),
        "kld_max": float(kld.max()),
        "top1_same": float((top_c == top_r).double().mean()),
        "top1_decisive": float(1.0 - decisive_miss.double().mean()),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "logprob_diff_mean": float(lp_diff.mean()),
        "logprob_diff_max": float(lp_diff.max()),
        "ppl_ratio": float(torch.exp(nll_c - nll_r)),
    }


def _starts(sequences: list[list[int]]) -> list[tuple[list[int], int]]:
    out, start = [], 0
    for s in sequences:
        out.append((s, start))
        start += len(s)
    return out


def gate_logits(metrics: dict[str, float], gates: ModelThresholds) -> list[str]:
    """What the teacher-forced metrics miss of the gates (empty: all met)."""
    problems = []
    if metrics["kld_mean"] > gates.kld_mean:
        problems.append(f"mean KLD {metrics['kld_mean']:.3g} > {gates.kld_mean:g}")
    if metrics["kld_p999"] > gates.kld_p999:
        problems.append(f"99.9th-percentile KLD {metrics['kld_p999']:.3g} > {gates.kld_p999:g}")
    if metrics["top1_decisive"] < gates.top1_min:
        problems.append(
            f"top-1 agreement {metrics['top1_decisive']:.4f} < {gates.top1_min:g} "
            f"(near-ties within {gates.tie_margin:g} excluded)"
        )
    if metrics["cosine_mean"] < gates.cosine_min:
        problems.append(f"mean logit cosine {metrics['cosine_mean']:.6f} < {gates.cosine_min:g}")
    if metrics["logprob_diff_mean"] > gates.logprob_diff_mean:
        problems.append(
            f"mean top-5 logprob error {metrics['logprob_diff_mean']:.3g} > "
            f"{gates.logprob_diff_mean:g}"
        )
    return problems


def compare_greedy(
    ours: list[tuple[list[int], list[list[int]]]],
    theirs: list[tuple[list[int], list[list[int]]]],
) -> tuple[dict[str, Any], list[str]]:
    """vLLM's rule: the sequences may diverge only where each side's token is among the other's
    top-5 candidates; after the first divergence nothing more is compared."""
    problems = []
    matched, total = [], 0
    for i, ((our_tokens, our_top), (ref_tokens, ref_top)) in enumerate(
        zip(ours, theirs, strict=True)
    ):
        total += len(ref_tokens)
        n = 0
        while n < min(len(our_tokens), len(ref_tokens)) and our_tokens[n] == ref_tokens[n]:
            n += 1
        matched.append(n)
        if n < len(ref_tokens):
            if n >= len(our_tokens):
                problems.append(f"prompt {i}: {len(our_tokens)} tokens, want {len(ref_tokens)}")
                continue
            ours_ok = our_tokens[n] in ref_top[n][:GREEDY_TOP_K]
            theirs_ok = ref_tokens[n] in our_top[n][:GREEDY_TOP_K]
            if not (ours_ok and theirs_ok):
                problems.append(
                    f"prompt {i}: token {n} is {our_tokens[n]}, the reference's is "
                    f"{ref_tokens[n]}, and they are not in each other's top {GREEDY_TOP_K}"
                )
    metrics = {
        "prompts": len(ours),
        "tokens": total,
        "matched_prefix": matched,
        "exact_match": float(sum(matched) / total) if total else 1.0,
    }
    return metrics, problems
