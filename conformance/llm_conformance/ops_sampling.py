"""Checks of logits processing and sampling, always on fp32 logits (the contract's dtype).

Sampling is checked four ways: greedy rows must be the exact argmax (ties to the lowest id);
seeded draws must be reproducible and independent of the rest of the batch; the histogram of
``SAMPLING_DRAWS`` seeded draws must be within ``SAMPLING_TV_MAX`` total variation of the exact
filtered distribution, computed in float64, with no draw outside its support; and the support
cases put each filter's boundary token at 10-46% of the mass, so a filter that keeps one token
too few or too many is seen in every run (see ``_support``). Top-p and min-p thresholds are
placed halfway between two candidate cut points, so the set of kept tokens is unambiguous in
any precision.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from llm_hal import DType, PenaltyMetadata, SamplingMetadata

from llm_conformance.cases import Params, op_check
from llm_conformance.compare import Check
from llm_conformance.harness import F64, Harness
from llm_conformance.tolerances import SAMPLING_DRAWS, SAMPLING_TV_MAX

FP32 = DType.FP32


def _logits(h: Harness, rows: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn((rows, vocab), generator=h.gen, dtype=torch.float32) * scale


def _quantized_logits(h: Harness, rows: int, vocab: int) -> torch.Tensor:
    """Logits on a 1/16 grid: exactly representable, ties common, no near-ties."""
    return (torch.randint(-256, 256, (rows, vocab), generator=h.gen) / 16).float()


def _padded_ids(h: Harness, rows: int, width: int, vocab: int) -> np.ndarray:
    ids = h.randint(0, vocab, (rows, width)).numpy()
    for r in range(rows):
        ids[r, int(h.randint(0, width + 1, (1,))) :] = -1
    return ids


# -------------------------------------------------------------------------------------------
# penalties and bans
# -------------------------------------------------------------------------------------------

PENALTIES: list[Params] = [
    {"rows": 1, "vocab": 8, "prompt": 3, "output": 2},
    {"rows": 4, "vocab": 300, "prompt": 20, "output": 10},
    {"rows": 7, "vocab": 1000, "prompt": 1, "output": 64},
    {"rows": 3, "vocab": 32000, "prompt": 50, "output": 1},
]


@op_check("apply_penalties", "elementwise", PENALTIES)
def _apply_penalties(h: Harness, p: Params) -> None:
    rows, vocab = p["rows"], p["vocab"]
    logits = _logits(h, rows, vocab)
    choices = torch.tensor(
        [
            [0.0, 0.0, 1.0],
            [0.5, 0.0, 1.0],
            [0.0, 0.3, 1.0],
            [0.0, 0.0, 1.3],
            [0.2, 0.1, 0.8],
            [1.5, 2.0, 1.1],
        ]
    )
    pick = choices[torch.arange(rows) % len(choices)]

    meta = PenaltyMetadata(
        prompt_ids=_padded_ids(h, rows, p["prompt"], vocab),
        output_ids=_padded_ids(h, rows, p["output"], vocab),
        presence=pick[:, 0].numpy(),
        frequency=pick[:, 1].numpy(),
        repetition=pick[:, 2].numpy(),
    )
    # The oracle only reads the metadata: the backend gets the same, untouched.
    want = h.oracle.apply_penalties(logits.to(F64), meta)
    dev = h.up(logits)
    result = h.backend.apply_penalties(dev, meta)
    h.close("result", result, want, dtype=FP32)
    h.close("in place", dev, want, dtype=FP32)


BANS: list[Params] = [
    {"rows": 1, "vocab": 8, "banned": 1},
    {"rows": 4, "vocab": 300, "banned": 5},
    {"rows": 9, "vocab": 32000, "banned": 3},
]


@op_check("apply_token_bans", "exact", BANS)
def _apply_token_bans(h: Harness, p: Params) -> None:
    logits = _logits(h, p["rows"], p["vocab"])
    banned = torch.from_numpy(_padded_ids(h, p["rows"], p["banned"], p["vocab"]))
    want = h.oracle.apply_token_bans(logits.to(F64), banned)
    dev = h.up(logits)
    result = h.backend.apply_token_bans(dev, h.up(banned))
    h.close("result", result, want, dtype=FP32)
    h.close("in place", dev, want, dtype=FP32)


# -------------------------------------------------------------------------------------------
# guided-decoding token mask
# -------------------------------------------------------------------------------------------

#: Rows cycle through four masks (see ``_bitmask``); vocabularies that are not a multiple of
#: 32 leave a partial last word. ``guarded``: the logits are a view inside a buffer with
#: sentinel columns on each side (a kernel that writes the whole last word is caught there).
BITMASK: list[Params] = [
    {"rows": 1, "vocab": 8},
    {"rows": 1, "vocab": 64, "inject": "nan"},
    {"rows": 4, "vocab": 300, "guarded": True},
    {"rows": 5, "vocab": 1000, "inject": "inf"},
    {"rows": 8, "vocab": 32000, "guarded": True},
    {"rows": 3, "vocab": 49152},
    {"rows": 6, "vocab": 151_937, "inject": "nan", "guarded": True},
]


def _bitmask(h: Harness, rows: int, vocab: int) -> torch.Tensor:
    """(rows, ceil(vocab / 32)) int32. Row r % 4: 0 random words, bits past the vocabulary
    clear (a kernel that reads them bans the next row's first tokens, which row 1 allows);
    1 all allowed (-1); 2 one token allowed (bit 31 of its word where the vocabulary has
    one), bits past the vocabulary set; 3 random words, bit 31 set in even words, clear in
    odd ones."""
    words = -(-vocab // 32)
    mask = h.randint(-(2**31), 2**31, (rows, words))  # int64 holding int32 values
    tail = vocab % 32
    past_vocab = (-1 << tail) if tail else 0  # bits of the last word past the vocabulary
    sign = torch.where(torch.arange(words) % 2 == 0, -(2**31), 0)
    for r in range(rows):
        kind = r % 4
        if kind == 0:
            mask[r, -1] &= ~past_vocab
        elif kind == 1:
            mask[r] = -1
        elif kind == 2:
            token = 32 * (words // 2) + 31 if vocab > 32 * (words // 2) + 31 else vocab - 1
            mask[r] = 0
            mask[r, token // 32] = _int32(1 << token % 32)
            mask[r, -1] |= past_vocab
        else:
            mask[r] = (mask[r] & (2**31 - 1)) | sign
    return mask.to(torch.int32)


def _int32(bits: int) -> int:
    """The int32 value whose two's-complement bits are ``bits`` (0 <= bits < 2**32)."""
    return bits - 2**32 if bits >= 2**31 else bits


@op_check("apply_token_bitmask", "exact", BITMASK)
def _apply_token_bitmask(h: Harness, p: Params) -> None:
    rows, vocab = p["rows"], p["vocab"]
    logits = _logits(h, rows, vocab)
    h.inject(logits, kind=p.get("inject"), count=max(3, rows * vocab // 500))
    mask = _bitmask(h, rows, vocab)
    want = h.oracle.apply_token_bitmask(logits.to(F64), mask)
    if p.get("guarded"):
        out = h.guarded(rows, vocab, FP32)
        h.backend.copy_(out.view, h.up(logits))
        dev = out.view
    else:
        dev = h.up(logits)
    result = h.backend.apply_token_bitmask(dev, h.up(mask))
    h.close("result", result, want, dtype=FP32)
    h.close("in place", dev, want, dtype=FP32)
    if p.get("guarded"):
        h.guard_intact("guard columns", out)


# -------------------------------------------------------------------------------------------
# sampling
# -------------------------------------------------------------------------------------------

SAMPLE: list[Params] = [
    {"kind": "greedy", "rows": 16, "vocab": 1000},
    {"kind": "mixed", "rows": 12, "vocab": 300},
    {"kind": "distribution", "vocab": 64, "temperature": 1.0, "top_p_keeps": 4},
    {"kind": "distribution", "vocab": 64, "temperature": 0.7, "top_k": 8},
    {"kind": "distribution", "vocab": 1000, "temperature": 1.0, "min_p_keeps": 7},
    {
        "kind": "distribution",
        "vocab": 64,
        "temperature": 1.5,
        "top_k": 12,
        "top_p_keeps": 9,
        "min_p_keeps": 5,
    },
    {"kind": "greedy", "rows": 3, "vocab": 32000},
]


def _row(temperature: float = 1.0, top_k: int = 0, **extra: Any) -> Params:
    return {"temperature": temperature, "top_k": top_k, **extra}


#: Support cases (see ``_support``): each row of a case is its own ladder of candidate logits
#: and its own filter, so a kernel that reads another row's parameters is caught too.
SUPPORT_ROWS: dict[str, list[Params]] = {
    "top_k": [
        _row(top_k=5),
        _row(0.7, top_k=2),
        _row(1.2, top_k=4, tie_at_k=True),  # the 4th and 5th tie: both are kept
    ],
    "top_p": [
        _row(top_p_keeps=4),
        _row(top_p_keeps=1),
        _row(0.8, top_p_keeps=6),
    ],
    "min_p": [
        _row(min_p_keeps=5),
        _row(1.5, min_p_keeps=2),
        _row(0.9, min_p_keeps=7),
    ],
    # The order top-k, top-p, min-p, and temperature before all three, each changes the set.
    "combined": [
        _row(0.7, top_k=6, top_p_keeps=4, min_p_keeps=3),
        _row(1.3, top_k=6, top_p_keeps=4),
        _row(0.8, top_k=7, min_p_keeps=5),
    ],
    # Logits of ~1000 (x / T ~ 4000: exp() overflows unless the maximum is subtracted); a row
    # with most tokens banned (-inf) and top_k past the finite ones; a row with one token left.
    "extremes": [
        _row(0.25, offset=1000.0),
        _row(top_k=40, banned=40, top_p_keeps=3),
        _row(banned=63),
    ],
}
SAMPLE += [{"kind": "support", "vocab": 64, "rows": name} for name in SUPPORT_ROWS]


def _sampling_meta(
    rows: int, temperature: float, top_k: int, top_p: float, min_p: float, seeds: np.ndarray
) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=np.full(rows, temperature),
        top_k=np.full(rows, top_k),
        top_p=np.full(rows, top_p),
        min_p=np.full(rows, min_p),
        seeds=seeds,
    )


@op_check("sample", "exact", SAMPLE, quick=(0, 1, 2, 10))
def _sample(h: Harness, p: Params) -> None:
    if p["kind"] == "greedy":
        _greedy(h, p)
    elif p["kind"] == "mixed":
        _mixed(h, p)
    elif p["kind"] == "support":
        _support(h, p)
    else:
        _distribution(h, p)


def _greedy(h: Harness, p: Params) -> None:
    logits = _quantized_logits(h, p["rows"], p["vocab"])
    logits[0, 7] = logits[0, 3] = logits[0].max() + 1  # a tie for the maximum: id 3 wins
    meta = _sampling_meta(p["rows"], 0.0, 0, 1.0, 0.0, np.arange(p["rows"]))
    dev = h.up(logits)
    got = h.backend.sample(dev, meta)
    h.same("argmax, ties to the lowest id", got, logits.argmax(dim=-1))
    h.unchanged("logits", dev, logits)


def _mixed(h: Harness, p: Params) -> None:
    rows, vocab = p["rows"], p["vocab"]
    logits = _logits(h, rows, vocab)
    seeds = h.randint(0, 2**62, (rows,)).numpy()
    temperature = np.where(np.arange(rows) % 2 == 0, 0.0, 0.9)
    meta = SamplingMetadata(
        temperature=temperature,
        top_k=np.where(np.arange(rows) % 3 == 0, 0, 40),
        top_p=np.full(rows, 0.95),
        min_p=np.full(rows, 0.0),
        seeds=seeds,
    )
    dev = h.up(logits)
    first = h.down(h.backend.sample(dev, meta))
    again = h.down(h.backend.sample(dev, meta))
    greedy = torch.from_numpy(temperature == 0)
    h.add(_exact("greedy rows", first[greedy], logits.argmax(dim=-1)[greedy]))
    h.add(_exact("same seeds, same tokens", again, first))
    support = h.oracle.filtered_probs(logits.to(F64), meta) > 0
    inside = support.gather(1, first.long().unsqueeze(1)).all()
    h.add(Check("draws inside the filtered support", bool(inside)))
    alone = []
    for r in range(rows):
        row_meta = SamplingMetadata(
            temperature=temperature[r : r + 1],
            top_k=meta.top_k[r : r + 1],
            top_p=meta.top_p[r : r + 1],
            min_p=meta.min_p[r : r + 1],
            seeds=seeds[r : r + 1],
        )
        alone.append(int(h.down(h.backend.sample(h.up(logits[r : r + 1]), row_meta))[0]))
    h.add(_exact("a row alone draws what it draws in the batch", torch.tensor(alone), first))


def _exact(name: str, got: torch.Tensor, want: torch.Tensor) -> Check:
    ok = got.shape == want.shape and torch.equal(got.long(), want.long())
    return Check(name, ok, "" if ok else f"got {got.tolist()[:8]}, want {want.tolist()[:8]}")


def _cut_between(sorted_values: torch.Tensor, keep: int) -> float:
    """A threshold halfway between the ``keep``-th and the next value of a sorted sequence."""
    return float((sorted_values[keep - 1] + sorted_values[keep]) / 2)


def _distribution(h: Harness, p: Params) -> None:
    vocab, temperature, top_k = p["vocab"], p["temperature"], p.get("top_k", 0)
    logits = _logits(h, 1, vocab)
    # Thresholds are derived from the exact probabilities so the kept set is unambiguous.
    scaled = logits[0].to(F64) / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], -float("inf"))
    probs = torch.softmax(scaled, dim=-1).sort(descending=True).values
    top_p = 1.0
    if "top_p_keeps" in p:
        cumulative = probs.cumsum(0)
        top_p = _cut_between(cumulative, p["top_p_keeps"] - 1)
        probs = probs[: p["top_p_keeps"]]
    min_p = 0.0
    if "min_p_keeps" in p:
        min_p = _cut_between(probs / probs[0], p["min_p_keeps"])
    one = _sampling_meta(1, temperature, top_k, top_p, min_p, np.zeros(1))
    exact = h.oracle.filtered_probs(logits.to(F64), one)[0]

    chunk = max(1, min(SAMPLING_DRAWS, 4_000_000 // vocab))
    counts = torch.zeros(vocab, dtype=F64)
    seed_base = int(h.randint(0, 2**40, (1,)))
    drawn = 0
    while drawn < SAMPLING_DRAWS:
        rows = min(chunk, SAMPLING_DRAWS - drawn)
        seeds = np.arange(seed_base + drawn, seed_base + drawn + rows)
        meta = _sampling_meta(rows, temperature, top_k, top_p, min_p, seeds)
        ids = h.down(h.backend.sample(h.up(logits.expand(rows, vocab)), meta)).long()
        counts += torch.bincount(ids, minlength=vocab).to(F64)[:vocab]
        drawn += rows
    observed = counts / drawn
    outside = int(counts[exact == 0].sum())
    h.add(
        Check(
            "draws inside the filtered support",
            outside == 0,
            "" if not outside else f"{outside} of {drawn} draws have probability 0",
        )
    )
    tv = float((observed - exact).abs().sum() / 2)
    h.add(
        Check(
            f"total variation over {drawn} draws",
            tv <= SAMPLING_TV_MAX,
            f"TV {tv:.4f}" + ("" if tv <= SAMPLING_TV_MAX else f" > {SAMPLING_TV_MAX}"),
            {"tv": tv},
        )
    )


# Support. The distribution test above bounds the total variation, and a filter that keeps
# one token too few or too many moves only that token's probability, which random logits make
# small: a top-k of k - 1 went unseen. Here the boundary is where the probability is: each row
# is a ladder of candidate logits 0.1 apart at random ids (the rest of the vocabulary far
# below), so the last token a filter keeps and the first it drops each hold 10-46% of the
# mass. The thresholds are placed halfway between two cut points, so the kept set is
# unambiguous in any precision. Over SUPPORT_DRAWS seeded draws per row: no draw may fall
# outside the exact support, and every token's count must be within Bernstein's bound of its
# expectation at false-alarm probability SUPPORT_FALSE_ALARM per token: a kept token of 10%
# expects 400 draws and must get more than 268, and a kernel that drops it gets none.

SUPPORT_DRAWS = 4000
SUPPORT_FALSE_ALARM = 1e-9
_LADDER = 10  # candidate tokens per row
_LADDER_STEP = 0.1


def _support_logits(h: Harness, vocab: int, row: Params) -> torch.Tensor:
    """One row's fp32 logits: the ladder at random ids, the rest 5-7 below its foot."""
    offset = row.get("offset", 0.0)
    steps = torch.arange(_LADDER, dtype=F64)
    if row.get("tie_at_k"):  # the k-th and the (k+1)-th candidates tie
        k = row["top_k"]
        steps[k:] -= 1
    ladder = 2.0 - _LADDER_STEP * steps
    logits = -4.0 - torch.rand(vocab, generator=h.gen, dtype=F64) * 2.0
    order = h.randperm(vocab)
    logits[order[:_LADDER]] = ladder
    banned = row.get("banned", 0)
    if banned:
        logits[order[vocab - banned :]] = -float("inf")
    return (logits + offset).float()


def _cut_below(values: torch.Tensor, keep: int) -> float:
    """A threshold halfway between ``values[keep - 1]`` and the value before it (0 for the
    first): the ``keep``-th of an increasing sequence is the first to reach it."""
    low = float(values[keep - 2]) if keep >= 2 else 0.0
    return (low + float(values[keep - 1])) / 2


def _support_filter(logits64: torch.Tensor, row: Params) -> tuple[float, float]:
    """(top_p, min_p) of a row: thresholds that keep ``top_p_keeps`` tokens of the top-k set
    and then ``min_p_keeps`` of those, computed on the exact float64 probabilities."""
    scaled = logits64 / row["temperature"]
    if row["top_k"]:
        scaled = scaled.masked_fill(scaled < scaled.topk(row["top_k"]).values[-1], -float("inf"))
    probs = torch.softmax(scaled, dim=-1).sort(descending=True).values
    top_p = 1.0
    if "top_p_keeps" in row:
        top_p = _cut_below(probs.cumsum(0), row["top_p_keeps"])
        probs = probs[: row["top_p_keeps"]]
    min_p = 0.0
    if "min_p_keeps" in row:
        min_p = _cut_between(probs / probs[0], row["min_p_keeps"])
    return top_p, min_p


def bernstein_bound(draws: int, p: float, false_alarm: float) -> float:
    """t with P(|X - draws * p| >= t) <= false_alarm for X ~ Binomial(draws, p), by
    Bernstein's inequality: 2 exp(-t^2 / (2 v + 2 t / 3)) with v = draws * p * (1 - p)."""
    log_term = math.log(2 / false_alarm)
    v = draws * p * (1 - p)
    return (2 * log_term / 3 + math.sqrt((2 * log_term / 3) ** 2 + 8 * log_term * v)) / 2


def _support(h: Harness, p: Params) -> None:
    vocab, rows = p["vocab"], SUPPORT_ROWS[p["rows"]]
    logits = torch.stack([_support_logits(h, vocab, row) for row in rows])  # (R, V) fp32
    filters = [_support_filter(logits[r].to(F64), row) for r, row in enumerate(rows)]
    meta = SamplingMetadata(
        temperature=np.array([row["temperature"] for row in rows]),
        top_k=np.array([row["top_k"] for row in rows]),
        top_p=np.array([top_p for top_p, _ in filters]),
        min_p=np.array([min_p for _, min_p in filters]),
        seeds=np.zeros(len(rows), dtype=np.int64),
    )
    exact = h.oracle.filtered_probs(logits.to(F64), meta)  # (R, V)
    # Every row SUPPORT_DRAWS times, interleaved: draw i of row r is batch row i * R + r.
    n, count = SUPPORT_DRAWS, len(rows)
    seed_base = int(h.randint(0, 2**40, (1,)))
    batch = SamplingMetadata(
        temperature=np.tile(meta.temperature, n),
        top_k=np.tile(meta.top_k, n),
        top_p=np.tile(meta.top_p, n),
        min_p=np.tile(meta.min_p, n),
        seeds=np.arange(seed_base, seed_base + n * count),
    )
    dev = h.up(logits.repeat(n, 1))
    ids = h.down(h.backend.sample(dev, batch)).long().reshape(n, count)
    for r in range(count):
        counts = torch.bincount(ids[:, r].clamp(0, vocab), minlength=vocab + 1)[:vocab]
        outside = int(ids[:, r].ge(vocab).sum() + ids[:, r].lt(0).sum())
        outside += int(counts[exact[r] == 0].sum())
        kept = int((exact[r] > 0).sum())
        h.add(
            Check(
                f"row {r}: draws inside the support of {kept} tokens",
                outside == 0,
                "" if not outside else f"{outside} of {n} draws outside it",
            )
        )
        expected = exact[r] * n
        bad = []
        for token in torch.nonzero(exact[r] > 0).flatten().tolist():
            pr = float(exact[r, token])
            t = bernstein_bound(n, pr, SUPPORT_FALSE_ALARM)
            got = int(counts[token])
            if abs(got - float(expected[token])) >= t:
                want = float(expected[token])
                bad.append(
                    f"token {token} (p={pr:.3f}) drawn {got} times, want {want:.0f} ± {t:.0f}"
                )
        h.add(
            Check(
                f"row {r}: every kept token drawn as often as its probability",
                not bad,
                "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""),
            )
        )


# -------------------------------------------------------------------------------------------
# logprobs
# -------------------------------------------------------------------------------------------

LOGPROBS: list[Params] = [
    {"rows": 1, "vocab": 8, "top": 0},
    {"rows": 4, "vocab": 300, "top": 1},
    {"rows": 7, "vocab": 1000, "top": 5},
    {"rows": 3, "vocab": 32000, "top": 20},
    {"rows": 16, "vocab": 49152, "top": 5},
    # Logits 500 apart: probabilities down to e^-500 underflow float32, log-probabilities not.
    {"rows": 5, "vocab": 1000, "top": 5, "scale": 16.0},
]


@op_check("compute_logprobs", "softmax", LOGPROBS)
def _compute_logprobs(h: Harness, p: Params) -> None:
    logits = _quantized_logits(h, p["rows"], p["vocab"]) * p.get("scale", 1.0)
    ids = h.randint(0, p["vocab"], (p["rows"],))
    ids[0] = int(logits[0].argmax())
    want = h.oracle.compute_logprobs(logits.to(F64), ids, p["top"])
    got = h.backend.compute_logprobs(h.up(logits), h.up(ids), p["top"])
    h.close("token logprobs", got.token_logprobs, want.token_logprobs, dtype=FP32)
    h.same("token ranks", got.token_ranks, want.token_ranks)
    h.same("top ids (ties: lower id first)", got.top_ids, want.top_ids)
    h.close("top logprobs", got.top_logprobs, want.top_logprobs, dtype=FP32)
