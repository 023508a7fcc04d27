"""Checks of the attention path: rotary embedding, the paged KV-cache write, and paged attention
for prefill and decode.

Attention inputs are built the way the engine builds them: queries are strided views out of a
fused projection, the cache blocks of a sequence are scattered over the cache in random order,
block-table entries past a sequence's need hold a value far outside the cache (the contract
allows anything there), and every slot of the cache, the unused blocks included, holds random
data written with the backend's own ``reshape_and_cache``. Besides random scores near 1, two
patterns have cases of their own: scores of hundreds to ~1e4 (``scores=large``: exp() must
not overflow) and attention sinks (``scores=sink``: P @ V must not be accumulated in bf16).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from llm_core.models.rope import cos_sin_cache
from llm_hal import AttentionMetadata, DType

from llm_conformance.cases import Params, op_check
from llm_conformance.compare import Check
from llm_conformance.harness import F64, GUARD, Harness, bits

# -------------------------------------------------------------------------------------------
# rotary embedding
# -------------------------------------------------------------------------------------------

MAX_POSITION = 4096
_ROTARY_SHAPES = [
    # tokens, query heads, kv heads, head size, rotary dims
    (1, 4, 4, 64, 64),
    (7, 6, 2, 80, 80),
    (5, 8, 2, 96, 48),
    (33, 9, 3, 64, 32),
    (16, 32, 8, 128, 128),
    (3, 4, 1, 72, 72),
    (64, 14, 2, 64, 64),
    (2, 2, 2, 256, 64),
]
ROTARY: list[Params] = [
    {"tokens": t, "hq": hq, "hkv": hkv, "head_size": d, "rotary_dim": r, "neox": neox}
    for t, hq, hkv, d, r in _ROTARY_SHAPES
    for neox in (True, False)
]
ROTARY += [
    {
        "tokens": 4,
        "hq": 4,
        "hkv": 2,
        "head_size": 64,
        "rotary_dim": 64,
        "neox": True,
        "inject": "nan",
    }
]


@op_check("rotary_embedding", "rotary", ROTARY, shape_of=lambda p: {"head_size": p["head_size"]})
def _rotary(h: Harness, p: Params) -> None:
    t, hq, hkv, d, rot = p["tokens"], p["hq"], p["hkv"], p["head_size"], p["rotary_dim"]
    widths = [GUARD, hq * d, hkv * d, hkv * d, GUARD]
    buf = h.randn((t, sum(widths)))[0]
    h.inject(torch.split(buf, widths, dim=-1)[1], kind=p.get("inject"))
    buf64 = buf.to(F64)
    cache = torch.from_numpy(cos_sin_cache(rot, MAX_POSITION, theta=10000.0))
    positions = h.randint(0, MAX_POSITION, (t,))
    if t > 2:  # the first and the last position of the table
        positions[0], positions[-1] = 0, MAX_POSITION - 1
    _, q64, k64, _, _ = (x.clone() for x in torch.split(buf64, widths, dim=-1))
    h.oracle.rotary_embedding(positions, q64, k64, cache.to(F64), d, p["neox"])

    be = h.backend
    dev_buf = h.up(buf)
    _, dev_q, dev_k, _, _ = be.split(dev_buf, widths)
    rq, rk = be.rotary_embedding(h.up(positions), dev_q, dev_k, h.up(cache), d, p["neox"])
    h.close("returned q", rq, q64)
    h.close("returned k", rk, k64)
    # In place: the handles hold the result (split may return views or copies).
    q_after, k_after = h.down(dev_q), h.down(dev_k)
    h.close("q in place", q_after, q64)
    h.close("k in place", k_after, k64)
    if rot < d:  # features past the rotary dims pass through bit-exactly
        q_in, k_in = torch.split(buf, widths, dim=-1)[1:3]
        for name, got, before, heads in (("q", q_after, q_in, hq), ("k", k_after, k_in, hkv)):
            tail = [slice(head * d + rot, (head + 1) * d) for head in range(heads)]
            changed = sum(int((bits(got[:, t]) != bits(before[:, t])).sum()) for t in tail)
            h.add(
                Check(
                    f"{name} features past the rotary dims untouched",
                    changed == 0,
                    "" if not changed else f"{changed} bytes changed",
                )
            )
    # v and the guard columns of the fused buffer must not change by a bit.
    after = h.down(dev_buf)
    untouched = torch.ones(after.shape, dtype=torch.bool)
    untouched[:, GUARD : GUARD + (hq + hkv) * d] = False
    bad = int((bits(after[untouched]) != bits(buf[untouched])).sum())
    h.add(Check("v and guards untouched", bad == 0, "" if not bad else f"{bad} bytes changed"))


# -------------------------------------------------------------------------------------------
# KV-cache write
# -------------------------------------------------------------------------------------------

RESHAPE_AND_CACHE: list[Params] = [
    {"tokens": 1, "hkv": 1, "head_size": 64, "block_size": 16, "blocks": 2},
    {"tokens": 16, "hkv": 2, "head_size": 64, "block_size": 16, "blocks": 3},
    {"tokens": 17, "hkv": 2, "head_size": 80, "block_size": 16, "blocks": 4, "strided": True},
    {"tokens": 33, "hkv": 8, "head_size": 128, "block_size": 32, "blocks": 3, "pads": 3},
    {"tokens": 5, "hkv": 4, "head_size": 96, "block_size": 8, "blocks": 4, "pads": 2},
    {"tokens": 64, "hkv": 1, "head_size": 80, "block_size": 8, "blocks": 12, "strided": True},
    {"tokens": 100, "hkv": 2, "head_size": 256, "block_size": 16, "blocks": 9},
    {"tokens": 9, "hkv": 3, "head_size": 72, "block_size": 1, "blocks": 20, "pads": 1},
]


def _attention_shape(p: Params) -> dict[str, Any]:
    return {"head_size": p["head_size"], "block_size": p["block_size"]}


@op_check("reshape_and_cache", "exact", RESHAPE_AND_CACHE, shape_of=_attention_shape)
def _reshape_and_cache(h: Harness, p: Params) -> None:
    t, hkv, d, bs, nb = p["tokens"], p["hkv"], p["head_size"], p["block_size"], p["blocks"]
    be = h.backend
    caches = be.allocate_kv_cache(nb, bs, hkv, d, h.dtype)
    want = [torch.zeros((nb * bs, hkv, d), dtype=F64) for _ in range(2)]
    order = h.randperm(nb * bs)
    # Two steps: the second overwrites some slots of the first and writes new ones.
    for step, slots in enumerate(
        (order[:t], torch.cat([order[t // 2 : t], order[t : t + t // 2 + 1]]))
    ):
        slots = slots.clone()
        pads = h.randperm(len(slots))[: p.get("pads", 0)]
        slots[pads] = -1
        n = len(slots)
        kv, kv64 = h.randn((n, 2 * hkv * d))
        if p.get("strided"):
            dev_kv = h.up(kv)
            dev_k, dev_v = be.split(dev_kv, [hkv * d, hkv * d])
        else:
            dev_k, dev_v = h.up(kv[:, : hkv * d]), h.up(kv[:, hkv * d :])
        meta = _single_batch_meta(slots.numpy(), bs)
        be.reshape_and_cache(dev_k, dev_v, caches[0], caches[1], meta)
        keep = slots >= 0
        for cache64, part in zip(want, (kv64[:, : hkv * d], kv64[:, hkv * d :]), strict=True):
            cache64[slots[keep]] = part[keep].reshape(-1, hkv, d)
        for name, cache, cache64 in zip(("key", "value"), caches, want, strict=True):
            h.close(f"step {step + 1} {name} cache", cache, cache64.reshape(nb, bs, hkv, d))


def _single_batch_meta(slots: np.ndarray, block_size: int) -> AttentionMetadata:
    """Metadata for a cache write only: one pseudo-sequence holding every token."""
    n = len(slots)
    return AttentionMetadata(
        query_start_loc=np.array([0, n]),
        seq_lens=np.array([n]),
        block_tables=np.zeros((1, 1)),
        slot_mapping=slots,
        block_size=block_size,
    )


# -------------------------------------------------------------------------------------------
# paged attention
# -------------------------------------------------------------------------------------------

#: Far outside any cache used here: a backend must not read table entries past a sequence's need.
TABLE_PAD = 1_000_003

_PREFILL_SHAPES: list[tuple[list[tuple[int, int]], int, int, int, int]] = [
    # [(cached, new) per sequence], block size, query heads, kv heads, head size
    ([(0, 1)], 16, 4, 4, 64),
    ([(0, 16)], 16, 8, 2, 64),
    ([(0, 17)], 16, 6, 2, 80),
    ([(16, 16), (5, 3), (0, 7)], 16, 8, 8, 96),
    ([(15, 1), (31, 2)], 16, 4, 4, 64),
    ([(180, 12)], 16, 4, 1, 64),
    ([(33, 2), (0, 1), (60, 5)], 8, 12, 4, 128),
    ([(40, 9)], 32, 3, 3, 80),
    ([(0, 1024)], 16, 8, 1, 64),
    ([(0, 63), (0, 64), (0, 65)], 64, 4, 2, 256),
    ([(100, 28)], 16, 14, 2, 64),
    ([(0, 37)], 1, 4, 2, 64),
    ([(0, 20), (3, 4)], 16, 2, 2, 72),
]
_DECODE_SHAPES: list[tuple[list[tuple[int, int]], int, int, int, int]] = [
    ([(0, 1)], 16, 4, 4, 64),
    ([(15, 1)], 16, 8, 2, 64),
    ([(16, 1)], 16, 6, 2, 80),
    ([(5, 1), (31, 1), (64, 1)], 16, 8, 8, 96),
    ([(300, 1)], 16, 8, 2, 80),
    ([(7, 1)] * 8, 8, 6, 2, 96),
    ([(2, 1), (100, 1)], 32, 4, 1, 128),
    ([(2047, 1)], 16, 8, 1, 64),
    ([((37 * i) % 500, 1) for i in range(16)], 16, 12, 4, 64),
    ([(63, 1), (64, 1)], 64, 4, 2, 256),
    ([(40, 1)], 1, 4, 2, 64),
    ([(129, 1), (10, 1)], 16, 14, 2, 72),
]
#: Large-score cases: scores of hundreds to ~1e4 (see ``_level_keys``). At most ~500 cache
#: slots, so every key of a KV head gets a score level of its own.
_LARGE_PREFILL_SHAPES: list[tuple[list[tuple[int, int]], int, int, int, int]] = [
    ([(0, 37)], 16, 8, 2, 64),
    ([(40, 9), (0, 20), (100, 3)], 16, 4, 4, 128),
    ([(0, 200)], 32, 6, 3, 80),
]
_LARGE_DECODE_SHAPES: list[tuple[list[tuple[int, int]], int, int, int, int]] = [
    ([(400, 1)], 16, 8, 2, 80),
    ([(5, 1), (64, 1), (129, 1)], 16, 8, 8, 96),
    ([((37 * i) % 60, 1) for i in range(6)], 8, 4, 1, 128),
]
_VARIANTS = {"window": (7, None), "softcap": (None, 30.0), "window+softcap": (5, 10.0)}


def _attention_cases(
    shapes: list[tuple[list[tuple[int, int]], int, int, int, int]],
    large: list[tuple[list[tuple[int, int]], int, int, int, int]],
    sinks: tuple[int, ...],
) -> list[Params]:
    def case(i: int, shape: tuple[Any, ...], variant: str) -> Params:
        contexts, bs, hq, hkv, d = shape
        window, cap = _VARIANTS.get(variant, (None, None))
        return {
            "contexts": [list(c) for c in contexts],
            "block_size": bs,
            "hq": hq,
            "hkv": hkv,
            "head_size": d,
            "strided": i % 4 != 3,
            "sliding_window": window,
            "soft_cap": cap,
        }

    cases = [case(i, s, "causal") for i, s in enumerate(shapes)]
    for variant in _VARIANTS:
        cases += [case(i, s, variant) for i, s in enumerate(shapes) if i % 3 == 1]
    cases.append({**cases[3], "inject": "nan"})
    cases += [{**case(i, shapes[i], "causal"), "scores": "sink"} for i in sinks]
    cases += [{**case(i, s, "causal"), "scores": "large"} for i, s in enumerate(large)]
    cases.append({**case(0, large[0], "window"), "scores": "large"})
    cases.append({**case(1, large[1], "softcap"), "scores": "large"})
    return cases


def _fill_cache(
    h: Harness, num_blocks: int, p: Params, sinks: list[int]
) -> tuple[tuple[Any, Any], torch.Tensor, torch.Tensor]:
    """Backend caches with random data in every slot, and the same in float64."""
    bs, hkv, d = p["block_size"], p["hkv"], p["head_size"]
    slots = num_blocks * bs
    caches = h.backend.allocate_kv_cache(num_blocks, bs, hkv, d, h.dtype)
    k, k64 = h.randn((slots, hkv * d))
    v, v64 = h.randn((slots, hkv * d))
    if p.get("scores") == "large":
        k, k64 = _level_keys(h, k64, hkv, d)
    order = h.randperm(slots)
    if p.get("scores") == "sink":
        k, k64, v, v64 = _sink_keys(h, k64, v64, hkv, d, torch.argsort(order)[sinks])
    h.backend.reshape_and_cache(
        h.up(k), h.up(v), caches[0], caches[1], _single_batch_meta(order.numpy(), bs)
    )
    logical = []
    for rows in (k64, v64):
        cache = torch.empty((slots, hkv, d), dtype=F64)
        cache[order] = rows.reshape(slots, hkv, d)
        logical.append(cache.reshape(num_blocks, bs, hkv, d))
    return caches, logical[0], logical[1]


# Large scores. A kernel that takes exp(score) without subtracting the running maximum
# overflows to inf (or underflows to 0) once scores pass ~88 in fp32 (~11 in fp16), and one
# that rescales its running sums wrongly when the maximum grows is off by factors of e^100;
# every other case keeps scores near 1, where both go unseen. Scores here are hundreds to ~1e4
# in magnitude, yet the answer stays well conditioned in fp32: each KV head's keys carry
# distinct integer levels in features 0 and 1 (exact in every dtype), every query weighs them
# with a power of two, so the scores of any two keys differ by at least GAP_MIN; feature 2
# adds a per-query offset of either sign; the remaining features are small noise. So every
# query attends almost entirely to one key (the next weighs < e^-6), and a correct fp32 kernel,
# whose scores are off by ~1e-3 at 1e4, is still within the attention tolerance.

#: Largest score magnitude aimed at. fp16: also keeps the unscaled q.k inside the fp16 range.
_LARGE_PEAK = {DType.FP16: 3e3}
_LARGE_PEAK_DEFAULT = 1e4
#: Smallest score difference between two keys (before the noise of the other features).
GAP_MIN = 8.0


def _level_keys(
    h: Harness, k64: torch.Tensor, hkv: int, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``(slots, hkv * d)`` whose features 0 and 1 hold slot levels ``16 * hi + lo``
    (a random permutation of the slots per KV head, centred), feature 2 holds 1."""
    slots = k64.shape[0]
    keys = k64.reshape(slots, hkv, d).clone()
    levels = torch.stack([h.randperm(slots) for _ in range(hkv)], dim=1)  # (slots, Hkv)
    keys[..., 0] = (levels // 16 - slots // 32).to(F64)
    keys[..., 1] = (levels % 16 - 8).to(F64)
    keys[..., 2] = 1.0
    keys[..., 3:] *= 0.5
    k = keys.reshape(slots, hkv * d).to(h.torch_dtype)
    return k, k.to(F64)


def _large_score_queries(
    h: Harness, q64: torch.Tensor, p: Params, scale: float, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries that weigh the key levels of ``_level_keys`` by a power of two ``g`` (score gap
    ``scale * g`` in [GAP_MIN, 2 * GAP_MIN)) and add a random offset of either sign."""
    t, hq, d = q64.shape[0], p["hq"], p["head_size"]
    queries = q64.reshape(t, hq, d).clone()
    g = 2.0 ** math.ceil(math.log2(GAP_MIN / scale))
    spread = scale * g * slots / 2  # the largest |level score|
    peak = _LARGE_PEAK.get(h.dtype, _LARGE_PEAK_DEFAULT)
    size = max(200.0, peak - spread)
    sign = torch.where(h.randint(0, 2, (t, hq)) == 0, -1.0, 1.0).to(F64)
    offset = sign * size * (0.3 + 0.7 * torch.rand((t, hq), generator=h.gen, dtype=F64))
    queries[..., 0] = 16 * g
    queries[..., 1] = g
    queries[..., 2] = offset / scale
    queries[..., 3:] *= 0.5
    q = queries.reshape(t, hq * d).to(h.torch_dtype)
    return q, q.to(F64)


# Attention sinks. Half of every query's weight on one key (the first of its sequence, as in
# trained models) and the rest spread thinly over a long context, with values of mean 2: each
# block of 16 keys then adds about 1% to an output near 1, less than a bf16 rounding step, so
# a kernel that accumulates P @ V in bf16 or fp16 loses most of the spread-out half, while in
# fp32 it is exact to the attention tolerance.


def _sink_keys(
    h: Harness, k64: torch.Tensor, v64: torch.Tensor, hkv: int, d: int, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature 0 of every key is 0 except in ``rows`` (the sinks), where it is 1; values + 2."""
    keys = k64.reshape(-1, hkv, d).clone()
    keys[..., 0] = 0.0
    keys[rows, :, 0] = 1.0
    k = keys.reshape(k64.shape).to(h.torch_dtype)
    v = (v64 + 2.0).to(h.torch_dtype)
    return k, k.to(F64), v, v.to(F64)


def _sink_queries(
    h: Harness, q64: torch.Tensor, p: Params, scale: float, longest: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature 0 of every query head weighs the sink: score ln(2 * longest), about half of
    the softmax of ``longest`` keys whose other scores are ~N(0, 1)."""
    queries = q64.reshape(q64.shape[0], p["hq"], p["head_size"]).clone()
    queries[..., 0] = math.log(2 * longest) / scale
    q = queries.reshape(q64.shape).to(h.torch_dtype)
    return q, q.to(F64)


def _metadata(h: Harness, p: Params) -> tuple[AttentionMetadata, int]:
    bs = p["block_size"]
    contexts = [tuple(c) for c in p["contexts"]]
    need = [-(-(c + n) // bs) for c, n in contexts]
    num_blocks = sum(need) + 3  # a few blocks no sequence owns
    order = h.randperm(num_blocks).tolist()
    tables = np.full((len(need), max(need) + 2), TABLE_PAD, dtype=np.int64)
    slots = []
    for b, ((cached, new), n_blocks) in enumerate(zip(contexts, need, strict=True)):
        tables[b, :n_blocks] = [order.pop() for _ in range(n_blocks)]
        slots += [int(tables[b, q // bs]) * bs + q % bs for q in range(cached, cached + new)]
    starts = np.concatenate([[0], np.cumsum([n for _, n in contexts])])
    lens = np.array([c + n for c, n in contexts])
    return AttentionMetadata(starts, lens, tables, np.array(slots), bs), num_blocks


def _attention(h: Harness, p: Params, decode: bool) -> None:
    meta, num_blocks = _metadata(h, p)
    sinks = [int(meta.block_tables[b, 0]) * p["block_size"] for b in range(meta.num_seqs)]
    (kc, vc), k64, v64 = _fill_cache(h, num_blocks, p, sinks)
    before = (h.down(kc), h.down(vc))
    width = p["hq"] * p["head_size"]
    q, q64 = h.randn((meta.num_tokens, width))
    scale = 1 / math.sqrt(p["head_size"])
    if p.get("scores") == "large":
        q, q64 = _large_score_queries(h, q64, p, scale, num_blocks * p["block_size"])
    elif p.get("scores") == "sink":
        q, q64 = _sink_queries(h, q64, p, scale, meta.max_seq_len)
    if p.get("inject"):
        # NaN in head 0 of the first and the last new token of every sequence: whole-prompt,
        # chunked and single-token paths each see one.
        for b in range(meta.num_seqs):
            for row in {int(meta.query_start_loc[b]), int(meta.query_start_loc[b + 1]) - 1}:
                q[row, 0] = q64[row, 0] = float("nan")
    dev_q = h.strided(q, extra=2 * p["hkv"] * p["head_size"]) if p["strided"] else h.up(q)
    window, cap = p["sliding_window"], p["soft_cap"]
    want = h.oracle.paged_attention_prefill(q64, k64, v64, meta, scale, window, cap)
    op = h.backend.paged_attention_decode if decode else h.backend.paged_attention_prefill
    got = op(dev_q, kc, vc, meta, scale, window, cap)
    kv_len = meta.max_seq_len
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want, kv_len=kv_len)
    h.with_out(
        lambda out: op(dev_q, kc, vc, meta, scale, window, cap, out=out), want, kv_len=kv_len
    )
    h.unchanged("key cache", kc, before[0])
    h.unchanged("value cache", vc, before[1])
    h.unchanged("query", dev_q, q)


@op_check(
    "paged_attention_prefill",
    "attention",
    _attention_cases(_PREFILL_SHAPES, _LARGE_PREFILL_SHAPES, sinks=(8, 10)),
    shape_of=_attention_shape,
    depends_on=("reshape_and_cache",),
)
def _prefill(h: Harness, p: Params) -> None:
    _attention(h, p, decode=False)


@op_check(
    "paged_attention_decode",
    "attention",
    _attention_cases(_DECODE_SHAPES, _LARGE_DECODE_SHAPES, sinks=(7, 8)),
    shape_of=_attention_shape,
    depends_on=("reshape_and_cache",),
)
def _decode(h: Harness, p: Params) -> None:
    _attention(h, p, decode=True)
