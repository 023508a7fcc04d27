"""The reference backend (``llm_hal.TorchBackend``, CPU, float64) against independent math.

The reference is the oracle of every other test and of the conformance suite, so the tricky
operators are checked here against straightforward loops written from the HAL docstrings:
rotary embedding, paged attention, the KV-cache write, penalties, sampling filters and draws,
quantized linear layers, mixture of experts and logprobs; the Gemma operators (gemma_rms_norm,
scale, soft_cap) against transformers' own modules, bit for bit in fp32 and bf16.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from llm_hal import (
    AttentionMetadata,
    PenaltyMetadata,
    QuantScheme,
    SamplingMetadata,
    TorchBackend,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def ref() -> TorchBackend:
    return TorchBackend("cpu")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# -------------------------------------------------------------------------------------------
# rotary embedding
# -------------------------------------------------------------------------------------------


def _cos_sin_cache(max_pos: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (np.arange(0, rot, 2) / rot)  # (R/2,)
    angles = np.outer(np.arange(max_pos), inv_freq)  # (P, R/2)
    return _t(np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32))


def _rotate_by_hand(
    x: np.ndarray, pos: np.ndarray, cache: np.ndarray, d: int, neox: bool
) -> np.ndarray:
    """Each rotated pair as a complex number times exp(i * angle): a' + i b' = (a + i b) e^{it}."""
    rot = cache.shape[1]
    out = x.copy()
    t_count, width = x.shape
    for t in range(t_count):
        for h in range(width // d):
            head = x[t, h * d : (h + 1) * d]
            for i in range(rot // 2):
                ia, ib = (i, i + rot // 2) if neox else (2 * i, 2 * i + 1)
                c, s = cache[pos[t], i], cache[pos[t], rot // 2 + i]
                z = complex(head[ia], head[ib]) * complex(c, s)
                out[t, h * d + ia], out[t, h * d + ib] = z.real, z.imag
    return out


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rot", [16, 8], ids=["full", "partial"])
def test_rotary_matches_complex_rotation(ref: TorchBackend, neox: bool, rot: int) -> None:
    rng = _rng(1)
    t, hq, hkv, d = 5, 3, 1, 16
    cache = _cos_sin_cache(64, rot)
    pos = np.array([0, 1, 7, 33, 63])
    # q and k are strided views of one fused qkv projection, as models produce them.
    qkv = _t(rng.standard_normal((t, (hq + 2 * hkv) * d)))
    q, k, _ = torch.split(qkv, [hq * d, hkv * d, hkv * d], dim=-1)
    want_q = _rotate_by_hand(q.numpy(), pos, cache.double().numpy(), d, neox)
    want_k = _rotate_by_hand(k.numpy(), pos, cache.double().numpy(), d, neox)
    untouched_v = qkv[:, (hq + hkv) * d :].clone()

    rq, rk = ref.rotary_embedding(_t(pos), q, k, cache, d, neox)

    assert rq is q and rk is k  # in place, as documented
    np.testing.assert_allclose(q.numpy(), want_q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(k.numpy(), want_k, rtol=0, atol=1e-12)
    assert torch.equal(qkv[:, (hq + hkv) * d :], untouched_v)
    if rot < d:  # features past rotary_dim pass through
        assert np.array_equal(
            q.numpy().reshape(t, hq, d)[..., rot:], want_q.reshape(t, hq, d)[..., rot:]
        )


def test_rotary_position_zero_is_identity(ref: TorchBackend) -> None:
    q = torch.randn(1, 32, dtype=F64)
    k = torch.randn(1, 16, dtype=F64)
    q0, k0 = q.clone(), k.clone()
    ref.rotary_embedding(torch.zeros(1, dtype=torch.int64), q, k, _cos_sin_cache(4, 16), 16, True)
    assert torch.equal(q, q0) and torch.equal(k, k0)


# -------------------------------------------------------------------------------------------
# KV-cache write and paged attention
# -------------------------------------------------------------------------------------------


def _layout(
    contexts: list[tuple[int, int]], block_size: int, num_blocks: int, rng: np.random.Generator
) -> AttentionMetadata:
    """Metadata for sequences given as (cached tokens, new tokens), on shuffled blocks.

    Table entries past a sequence's need hold an out-of-range block id: the contract says
    they may hold anything.
    """
    need = [-(-(c + n) // block_size) for c, n in contexts]
    free = list(rng.permutation(num_blocks))
    width = max(need)
    tables = np.full((len(contexts), width), num_blocks + 5, dtype=np.int32)
    slots: list[int] = []
    for b, ((cached, new), n_blocks) in enumerate(zip(contexts, need, strict=True)):
        tables[b, :n_blocks] = [free.pop() for _ in range(n_blocks)]
        for p in range(cached, cached + new):
            slots.append(int(tables[b, p // block_size]) * block_size + p % block_size)
    starts = np.concatenate([[0], np.cumsum([n for _, n in contexts])])
    seq_lens = np.array([c + n for c, n in contexts])
    return AttentionMetadata(starts, seq_lens, tables, np.array(slots), block_size)


def _dense_attention(
    q: np.ndarray,  # (Lq, Hq, D): the last Lq tokens of the context
    k: np.ndarray,  # (L, Hkv, D)
    v: np.ndarray,
    scale: float,
    window: int | None,
    soft_cap: float | None,
) -> np.ndarray:
    lq, hq, _ = q.shape
    length, hkv, _ = k.shape
    out = np.zeros_like(q)
    for i in range(lq):
        p = length - lq + i
        for h in range(hq):
            g = h // (hq // hkv)
            visible = [j for j in range(length) if j <= p and (window is None or j > p - window)]
            s = np.array([scale * float(q[i, h] @ k[j, g]) for j in visible])
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            w = np.exp(s - s.max())
            w /= w.sum()
            out[i, h] = sum(wj * v[j, g] for wj, j in zip(w, visible, strict=True))
    return out


def test_reshape_and_cache_writes_only_mapped_slots(ref: TorchBackend) -> None:
    rng = _rng(2)
    hkv, d, block_size, num_blocks = 2, 4, 4, 5
    key_cache = torch.full((num_blocks, block_size, hkv, d), -7.0, dtype=torch.float32)
    value_cache = torch.full_like(key_cache, -9.0)
    kv = _t(rng.standard_normal((4, 2 * hkv * d)))
    key, value = torch.split(kv, [hkv * d, hkv * d], dim=-1)  # strided views
    slots = np.array([3, -1, 17, 8])
    meta = AttentionMetadata(np.array([0, 4]), np.array([4]), np.array([[0]]), slots, block_size)

    ref.reshape_and_cache(key, value, key_cache, value_cache, meta)

    want_k = torch.full_like(key_cache, -7.0).view(-1, hkv, d)
    want_v = torch.full_like(value_cache, -9.0).view(-1, hkv, d)
    for t, slot in enumerate(slots):
        if slot >= 0:
            want_k[slot] = key[t].reshape(hkv, d).float()
            want_v[slot] = value[t].reshape(hkv, d).float()
    assert torch.equal(key_cache.view(-1, hkv, d), want_k)
    assert torch.equal(value_cache.view(-1, hkv, d), want_v)


@pytest.mark.parametrize(
    ("window", "soft_cap"), [(None, None), (5, None), (None, 3.0), (4, 2.0)],
    ids=["causal", "window", "softcap", "window+softcap"],
)  # fmt: skip
def test_paged_prefill_matches_dense_attention(
    ref: TorchBackend, window: int | None, soft_cap: float | None
) -> None:
    rng = _rng(3)
    hq, hkv, d, block_size, num_blocks = 6, 2, 8, 4, 16
    # a prefix already cached + new tokens; a fresh prompt; one new token after a long prefix
    contexts = [(5, 3), (0, 4), (9, 1), (3, 5)]
    meta = _layout(contexts, block_size, num_blocks, rng)
    key_cache = _t(rng.standard_normal((num_blocks, block_size, hkv, d)) * 100)  # garbage
    value_cache = _t(rng.standard_normal((num_blocks, block_size, hkv, d)) * 100)
    ks, vs = [], []
    for b, (cached, new) in enumerate(contexts):
        k = rng.standard_normal((cached + new, hkv, d))
        v = rng.standard_normal((cached + new, hkv, d))
        for p in range(cached + new):
            blk = meta.block_tables[b, p // block_size]
            key_cache[blk, p % block_size] = _t(k[p])
            value_cache[blk, p % block_size] = _t(v[p])
        ks.append(k)
        vs.append(v)
    qkv = _t(rng.standard_normal((meta.num_tokens, (hq + 2 * hkv) * d)))
    query = qkv[:, : hq * d]  # a strided view
    scale = 1 / math.sqrt(d)

    got = ref.paged_attention_prefill(query, key_cache, value_cache, meta, scale, window, soft_cap)

    for b, (_, new) in enumerate(contexts):
        q0 = int(meta.query_start_loc[b])
        q = query[q0 : q0 + new].numpy().reshape(new, hq, d)
        want = _dense_attention(q, ks[b], vs[b], scale, window, soft_cap)
        np.testing.assert_allclose(got[q0 : q0 + new].numpy(), want.reshape(new, -1), atol=1e-12)


def test_paged_decode_matches_prefill_and_refuses_multi_token(ref: TorchBackend) -> None:
    rng = _rng(4)
    hq, hkv, d, block_size, num_blocks = 4, 4, 8, 4, 12
    meta = _layout([(6, 1), (0, 1), (12, 1)], block_size, num_blocks, rng)
    key_cache = _t(rng.standard_normal((num_blocks, block_size, hkv, d)))
    value_cache = _t(rng.standard_normal((num_blocks, block_size, hkv, d)))
    query = _t(rng.standard_normal((3, hq * d)))
    args = (query, key_cache, value_cache, meta, 0.3)
    assert torch.equal(ref.paged_attention_decode(*args), ref.paged_attention_prefill(*args))
    two_new = _layout([(3, 2)], block_size, num_blocks, rng)
    with pytest.raises(ValueError, match="one new token"):
        ref.paged_attention_decode(query[:2], key_cache, value_cache, two_new, 0.3)


# -------------------------------------------------------------------------------------------
# logits processing
# -------------------------------------------------------------------------------------------


def test_penalties_follow_vllm_semantics(ref: TorchBackend) -> None:
    rng = _rng(5)
    vocab = 10
    logits = _t(rng.standard_normal((3, vocab)) * 3).float()
    prompt = np.array([[1, 1, 4, -1], [2, -1, -1, -1], [-1, -1, -1, -1]])
    output = np.array([[4, 4, 4, 7], [2, 5, -1, -1], [9, -1, -1, -1]])
    presence = np.array([0.5, 0.0, 1.5])
    frequency = np.array([0.25, 0.7, 0.0])
    repetition = np.array([1.3, 1.0, 2.0])
    meta = PenaltyMetadata(prompt, output, presence, frequency, repetition)
    want = logits.double().numpy().copy()
    for b in range(3):
        counts = {tok: int((output[b] == tok).sum()) for tok in range(vocab)}
        seen = set(prompt[b][prompt[b] >= 0]) | set(output[b][output[b] >= 0])
        for tok in range(vocab):
            x = want[b, tok]
            if tok in seen:  # once per token, however often it was seen
                x = x / repetition[b] if x > 0 else x * repetition[b]
            x -= frequency[b] * counts[tok] + presence[b] * (counts[tok] > 0)
            want[b, tok] = x
    got = ref.apply_penalties(logits, meta)
    assert got is logits
    np.testing.assert_allclose(logits.numpy(), want, rtol=1e-6, atol=1e-6)


def test_token_bans_ignore_padding(ref: TorchBackend) -> None:
    logits = torch.zeros(2, 5)
    ref.apply_token_bans(logits, torch.tensor([[3, -1], [0, 4]]))
    want = torch.zeros(2, 5)
    want[0, 3] = want[1, 0] = want[1, 4] = float("-inf")
    assert torch.equal(logits, want)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100])
def test_token_bitmask_matches_unpacked_bits(ref: TorchBackend, vocab: int) -> None:
    """Bit t % 32 of word t // 32, words little-endian int32: the same as unpacking the mask's
    bytes least significant bit first. Bits past the vocabulary are ignored."""
    rng = _rng(vocab)
    words = -(-vocab // 32)
    mask = rng.integers(-(2**31), 2**31, (4, words)).astype(np.int32)
    mask[1] = -1  # all allowed
    mask[2] = 0
    mask[2, (vocab - 1) // 32] = np.uint32(1 << (vocab - 1) % 32).view(np.int32)  # only the last
    mask[3, 0] |= np.int32(-(2**31))  # bit 31 set (token 31, where the vocabulary has one)
    logits = _t(rng.standard_normal((4, vocab)))
    logits[0, 0], logits[3, 0] = float("nan"), float("inf")
    allowed = np.unpackbits(mask.astype("<i4").view(np.uint8), axis=1, bitorder="little")
    want = np.where(allowed[:, :vocab] == 1, logits.numpy(), -np.inf)
    assert ref.apply_token_bitmask(logits, _t(mask)) is logits
    np.testing.assert_array_equal(logits.numpy(), want)  # NaN where allowed stays NaN
    assert np.isneginf(logits[2].numpy()).sum() == vocab - 1


def _filter_by_hand(
    row: np.ndarray, temp: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    if temp == 0:
        out = np.zeros_like(row)
        out[int(np.argmax(row))] = 1.0
        return out
    x = row / temp
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), dtype=bool)
    keep[order[: (top_k or len(x))]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    mass, nucleus = 0.0, np.zeros(len(x), dtype=bool)
    for i in order:  # the smallest most-likely set whose mass reaches top_p
        if not keep[i] or mass >= top_p:
            break
        nucleus[i] = True
        mass += p[i]
    p = np.where(nucleus, p, 0.0)
    p = np.where(p < min_p * p.max(), 0.0, p)
    return p / p.sum()


def test_filtered_probs_match_hand_filters(ref: TorchBackend) -> None:
    rng = _rng(6)
    settings = [  # temperature, top_k, top_p, min_p
        (1.0, 0, 1.0, 0.0),
        (0.7, 3, 1.0, 0.0),
        (1.3, 0, 0.6, 0.0),
        (1.0, 0, 1.0, 0.2),
        (0.9, 5, 0.8, 0.1),
        (0.0, 4, 0.5, 0.3),  # greedy ignores the filters
        (2.0, 100, 0.95, 0.0),  # top_k larger than the vocabulary
    ]
    logits = _t(rng.standard_normal((len(settings), 12)) * 2).float()
    cols = list(zip(*settings, strict=True))
    meta = SamplingMetadata(cols[0], cols[1], cols[2], cols[3], np.arange(len(settings)))
    got = ref.filtered_probs(logits, meta).double().numpy()
    for b, (temp, k, p, m) in enumerate(settings):
        want = _filter_by_hand(logits[b].double().numpy(), temp, k, p, m)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-7, err_msg=f"row {b}")


def test_greedy_ties_go_to_the_lowest_id(ref: TorchBackend) -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 1.0, 5.0]])
    meta = SamplingMetadata([0, 0], [0, 0], [1, 1], [0, 0], [0, 1])
    assert ref.sample(logits, meta).tolist() == [1, 0]


def test_sample_is_seeded_and_row_independent(ref: TorchBackend) -> None:
    rng = _rng(7)
    logits = _t(rng.standard_normal((64, 50))).float()
    n = len(logits)
    meta = SamplingMetadata(np.ones(n), np.zeros(n), np.ones(n), np.zeros(n), np.arange(n) + 1000)
    first = ref.sample(logits, meta)
    assert torch.equal(first, ref.sample(logits, meta))
    assert len(set(first.tolist())) > 10  # different seeds draw different tokens
    # The same row and seed in another batch draws the same token.
    sub = SamplingMetadata([1.0, 0.0, 1.0], [0] * 3, [1.0] * 3, [0.0] * 3, [1005, 1, 1017])
    again = ref.sample(logits[[5, 9, 17]], sub)
    assert again[0] == first[5] and again[2] == first[17]
    assert again[1] == logits[9].argmax()
    assert torch.equal(logits, _t(_rng(7).standard_normal((64, 50))).float())  # untouched


def test_sample_distribution_matches_filtered_probs(ref: TorchBackend) -> None:
    # One logits row repeated over 1e5 rows with distinct seeds: 1e5 independent draws.
    draws = 100_000
    row = torch.tensor([[0.9, -1.0, 2.0, 0.5, 1.6, -0.5, 1.2, 0.2]])
    logits = row.repeat(draws, 1)
    meta = SamplingMetadata(
        np.full(draws, 0.8), np.full(draws, 6), np.full(draws, 0.9), np.full(draws, 0.08),
        np.arange(draws),
    )  # fmt: skip
    probs = ref.filtered_probs(row, SamplingMetadata([0.8], [6], [0.9], [0.08], [0]))[0]
    assert 3 <= int((probs > 0).sum()) < 8  # the filters cut, and leave a real choice

    tokens = ref.sample(logits, meta)

    empirical = torch.bincount(tokens, minlength=8).double() / draws
    assert torch.all(empirical[probs == 0] == 0)
    tv = 0.5 * float((empirical - probs.double()).abs().sum())
    assert tv <= 0.01, f"total-variation distance {tv:.4f}"


def test_logprobs_ranks_and_top(ref: TorchBackend) -> None:
    logits = torch.tensor([[2.0, 1.0, 2.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 3.0]])
    result = ref.compute_logprobs(logits, torch.tensor([1, 2]), num_top=3)
    lse = torch.logsumexp(logits.double(), dim=-1, keepdim=True)
    want_lp = (logits.double() - lse).float()
    assert result.token_ranks.tolist() == [3, 2]  # rank = 1 + strictly more likely tokens
    torch.testing.assert_close(result.token_logprobs.float(), want_lp[[0, 1], [1, 2]])
    assert result.top_ids.tolist() == [[0, 2, 1], [4, 0, 1]]  # ties: lower id first
    torch.testing.assert_close(result.top_logprobs.float(), want_lp.gather(1, result.top_ids))
    empty = ref.compute_logprobs(logits, torch.tensor([0, 0]), num_top=0)
    assert tuple(empty.top_ids.shape) == (2, 0)


# -------------------------------------------------------------------------------------------
# linear layers
# -------------------------------------------------------------------------------------------


def _w8a16(rng: np.random.Generator, n: int, k: int, group: int):
    q = rng.integers(-128, 128, (n, k))
    scales = rng.uniform(0.001, 0.02, (n, k // group))
    dense = np.array([[q[i, j] * scales[i, j // group] for j in range(k)] for i in range(n)])
    return q, scales, dense


@pytest.mark.parametrize("group", [8, 0], ids=["group8", "per-channel"])
def test_w8a16_matches_hand_dequantization(ref: TorchBackend, group: int) -> None:
    rng = _rng(8)
    n, k = 6, 32
    q, scales, dense = _w8a16(rng, n, k, group or k)
    x, bias = rng.standard_normal((3, k)), rng.standard_normal(n)
    w = ref.prepare_linear(
        _t(q.astype(np.int8)), _t(bias), QuantScheme.W8A16, _t(scales), group_size=group
    )
    np.testing.assert_allclose(ref.linear(_t(x), w).numpy(), x @ dense.T + bias, atol=1e-12)


def test_w4a16_matches_hand_dequantization(ref: TorchBackend) -> None:
    rng = _rng(9)
    n, k, group = 5, 16, 8
    q = rng.integers(0, 16, (n, k))
    zeros = rng.integers(0, 16, (n, k // group)).astype(np.float64)
    scales = rng.uniform(0.01, 0.1, (n, k // group))
    packed = np.zeros((n, k // 2), dtype=np.uint8)
    for i in range(n):
        for j in range(k // 2):  # element 2j in the low nibble, 2j + 1 in the high one
            packed[i, j] = q[i, 2 * j] | (q[i, 2 * j + 1] << 4)
    dense = np.array(
        [
            [(q[i, j] - zeros[i, j // group]) * scales[i, j // group] for j in range(k)]
            for i in range(n)
        ]
    )
    x = rng.standard_normal((4, k))
    w = ref.prepare_linear(_t(packed), None, QuantScheme.W4A16, _t(scales), _t(zeros), group)
    assert (w.out_features, w.in_features) == (n, k)
    np.testing.assert_allclose(ref.linear(_t(x), w).numpy(), x @ dense.T, atol=1e-12)


def test_w8a8_matches_int32_accumulation(ref: TorchBackend) -> None:
    rng = _rng(10)
    n, k = 7, 24
    q = rng.integers(-127, 128, (n, k))
    scales = rng.uniform(0.001, 0.01, (n, 1))
    x = rng.standard_normal((3, k))
    x[1] *= 50  # per-token activation scales differ a lot
    want = np.zeros((3, n))
    for t in range(3):
        a_scale = np.abs(x[t]).max() / 127
        xq = np.clip(np.round(x[t] / a_scale), -127, 127).astype(np.int64)
        acc = q.astype(np.int64) @ xq  # exact integer accumulation, (N,)
        want[t] = acc * a_scale * scales[:, 0]
    w = ref.prepare_linear(_t(q.astype(np.int8)), None, QuantScheme.W8A8, _t(scales))
    np.testing.assert_allclose(ref.linear(_t(x), w).numpy(), want, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------------
# norms
# -------------------------------------------------------------------------------------------


def test_rms_norm_with_residual(ref: TorchBackend) -> None:
    rng = _rng(11)
    x, res, weight = (
        rng.standard_normal((3, 16)),
        rng.standard_normal((3, 16)),
        rng.standard_normal(16),
    )
    y, s = ref.rms_norm(_t(x), _t(weight), 1e-6, residual=_t(res))
    summed = x + res
    want = summed / np.sqrt((summed**2).mean(axis=1, keepdims=True) + 1e-6) * weight
    np.testing.assert_allclose(s.numpy(), summed, atol=1e-14)
    np.testing.assert_allclose(y.numpy(), want, atol=1e-12)


def test_layer_norm(ref: TorchBackend) -> None:
    rng = _rng(12)
    x, w, b = rng.standard_normal((2, 10)) + 3, rng.standard_normal(10), rng.standard_normal(10)
    mean, var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    want = (x - mean) / np.sqrt(var + 1e-5) * w + b
    np.testing.assert_allclose(ref.layer_norm(_t(x), _t(w), _t(b), 1e-5).numpy(), want, atol=1e-12)


# -------------------------------------------------------------------------------------------
# Gemma: gemma_rms_norm, scale, soft_cap, against transformers in the model's dtype
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("module", ["gemma2", "gemma3"])
def test_gemma_rms_norm_is_transformers_bit_for_bit(
    ref: TorchBackend, dtype: torch.dtype, residual: bool, module: str
) -> None:
    if module == "gemma2":
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm as Norm
    else:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm as Norm
    gen = torch.Generator().manual_seed(21)
    t, hidden, eps = 7, 2304, 1e-6
    x = (torch.randn((t, hidden), generator=gen) * 3).to(dtype)
    res = torch.randn((t, hidden), generator=gen).to(dtype)
    norm = Norm(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=gen) * 0.5)
        s = x + res if residual else x  # the decoder's residual add, in the model's dtype
        want = norm(s)
    y, s_out = ref.gemma_rms_norm(x, norm.weight.detach(), eps, res if residual else None)
    assert y.dtype == dtype and torch.equal(y, want)
    assert (s_out is None) if not residual else torch.equal(s_out, s)
    # Per head (Gemma 3's q/k norms): rows of head_size.
    heads = x.reshape(t * 9, 256)
    qk = Norm(256, eps=eps).to(dtype)
    with torch.no_grad():
        qk.weight.copy_(torch.randn(256, generator=gen))
        assert torch.equal(ref.gemma_rms_norm(heads, qk.weight.detach(), eps)[0], qk(heads))


def test_gemma_rms_norm_rounds_once(ref: TorchBackend) -> None:
    """bf16: the product with (1 + w) is taken before rounding (rms_norm rounds first)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 5.0]], dtype=torch.bfloat16)
    w = torch.tensor([0.3, -0.7, 0.01, 2.0], dtype=torch.bfloat16)
    xf = x.double()
    normed = xf / torch.sqrt((xf**2).mean() + 1e-6)
    want = (normed * (1 + w.double())).to(torch.bfloat16)  # one rounding (fp64 is exact enough)
    assert torch.equal(ref.gemma_rms_norm(x, w, 1e-6)[0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [640, 2304, 2560, 3584])
def test_scale_is_transformers_embed_scale(
    ref: TorchBackend, dtype: torch.dtype, hidden: int
) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    gen = torch.Generator().manual_seed(22)
    emb = Gemma3TextScaledWordEmbedding(50, hidden, 0, embed_scale=hidden**0.5).to(dtype)
    ids = torch.randint(0, 50, (9,), generator=gen)
    with torch.no_grad():
        want = emb(ids)  # table[ids] * embed_scale.to(dtype)
        # Gemma 2: hidden * torch.tensor(hidden ** 0.5, dtype=hidden.dtype)
        rows = emb.weight[ids]
        assert torch.equal(want, rows * torch.tensor(hidden**0.5, dtype=dtype))
    assert torch.equal(ref.scale(rows, hidden**0.5), want)


def test_soft_cap_matches_the_formula_and_saturates(ref: TorchBackend) -> None:
    x = torch.tensor([[0.0, 1.0, -30.0, 30.0, 1e4, -1e4, float("inf"), -float("inf")]], dtype=F64)
    want = 30.0 * np.tanh(x.numpy() / 30.0)
    np.testing.assert_allclose(ref.soft_cap(x, 30.0).numpy(), want, rtol=1e-15)
    assert ref.soft_cap(x, 30.0)[0, -2:].tolist() == [30.0, -30.0]
    assert torch.isnan(ref.soft_cap(torch.tensor([[float("nan")]]), 30.0)).all()
    # fp32 logits of Gemma 2: computed in fp32, as transformers does.
    logits = torch.randn((2, 1000), generator=torch.Generator().manual_seed(23)) * 40
    assert torch.equal(ref.soft_cap(logits, 30.0), torch.tanh(logits / 30.0) * 30.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="cap > 0"):
            ref.soft_cap(logits, bad)


# -------------------------------------------------------------------------------------------
# mixture of experts
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_route_matches_softmax_top_k(ref: TorchBackend, renormalize: bool) -> None:
    rng = _rng(13)
    logits = rng.standard_normal((5, 8))
    weights, ids = ref.moe_route(_t(logits), 3, renormalize)
    for t in range(5):
        p = np.exp(logits[t] - logits[t].max())
        p /= p.sum()
        top = np.argsort(-p)[:3]
        want = p[top] / (p[top].sum() if renormalize else 1.0)
        assert ids[t].tolist() == top.tolist()
        np.testing.assert_allclose(weights[t].numpy(), want, atol=1e-12)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_moe_experts_match_loop(ref: TorchBackend, activation: str) -> None:
    rng = _rng(14)
    t_count, h, inter, experts, top_k = 6, 8, 5, 4, 2
    x = rng.standard_normal((t_count, h))
    w13 = rng.standard_normal((experts, 2 * inter, h)) * 0.3
    w2 = rng.standard_normal((experts, h, inter)) * 0.3
    ids = np.array([[0, 3], [3, 1], [2, 0], [1, 1], [0, 2], [3, 0]])
    weights = rng.uniform(0, 1, (t_count, top_k))

    def act(g: np.ndarray) -> np.ndarray:
        if activation == "silu":
            return g / (1 + np.exp(-g))
        return 0.5 * g * (1 + np.vectorize(math.erf)(g / math.sqrt(2)))

    want = np.zeros((t_count, h))
    for t in range(t_count):
        for j in range(top_k):
            e = ids[t, j]
            gate_up = w13[e] @ x[t]
            want[t] += weights[t, j] * (w2[e] @ (act(gate_up[:inter]) * gate_up[inter:]))
    got = ref.moe_experts(_t(x), _t(w13), _t(w2), _t(weights), _t(ids), activation)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
