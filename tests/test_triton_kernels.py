"""The Triton kernels of the CUDA/ROCm backends against the reference, in Triton's interpreter.

``TRITON_INTERPRET=1`` (set before anything imports the kernels) runs each kernel on CPU
tensors, so every operator of :class:`TritonBackend` is checked here without a GPU: fp32,
bf16 and fp16 inputs against the reference run in float64 on the same (rounded) values, with
the project's tolerance table (elementwise bound and NMSE). Tiles are tiny (16 keys, 64
columns) so that small shapes cross tile, block and split boundaries.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: see the docstring

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
from llm_triton.kernels.config import require_interpreter

require_interpreter()

from llm_hal import DType, SamplingMetadata, TorchBackend  # noqa: E402
from llm_triton.backend import TritonBackend  # noqa: E402
from llm_triton.kernels import KernelConfig, paged_attention_decode  # noqa: E402
from llm_triton.selfcheck import attention_case, compare  # noqa: E402

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
#: Tiny tiles, and a device of 16 "SMs" so that few sequences make decode split its context.
TEST_CONFIG = KernelConfig(
    prefill_block_m=16,
    prefill_block_n=16,
    decode_block_n=16,
    max_splits=8,
    num_sms=16,
    elementwise_block=64,
)
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16")]
ALL_DTYPES = [*DTYPES, pytest.param(F16, id="fp16")]


@pytest.fixture(scope="module")
def backend() -> TritonBackend:
    return TritonBackend("cpu", TEST_CONFIG)


@pytest.fixture(scope="module")
def ref() -> TorchBackend:
    return TorchBackend("cpu")


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


#: Waiver: Triton 3.9's interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest
#: even), so a bf16 result may be one full ulp off instead of half of one. bf16 bounds are
#: doubled here; fp16 (rounded correctly by the interpreter) keeps the table's bounds.
INTERPRETER_BF16_SLACK = 2.0


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, op_class: str) -> None:
    slack = INTERPRETER_BF16_SLACK if dtype == BF16 else 1.0
    result = compare(out, ref, dtype, op_class, slack)
    assert result.ok, (
        f"{op_class}: max |err| {result.max_abs:.3g}, NMSE {result.nmse:.3g} {result.detail}"
    )


# -------------------------------------------------------------------------------------------
# elementwise kernels
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hidden", [64, 700])  # 700: two column tiles of 512, a ragged end
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm(backend, ref, dtype, hidden, with_residual):
    wide = rand((5, hidden + 32), dtype, 1)
    x = wide[:, :hidden]  # a strided view, as from split
    w = 1 + 0.1 * rand((hidden,), dtype, 2)
    r = rand((5, hidden), dtype, 3) if with_residual else None
    want, want_s = ref.rms_norm(x.double(), w.double(), 1e-6, None if r is None else r.double())
    got, got_s = backend.rms_norm(x, w, 1e-6, None if r is None else r.clone())
    assert got.dtype == dtype and got.shape == (5, hidden)
    assert_close(got, want, dtype, "norm")
    if with_residual:
        assert_close(got_s, want_s, dtype, "elementwise")
    else:
        assert got_s is None


def test_rms_norm_writes_out_and_residual_in_place(backend):
    x, r, w = rand((3, 96), F32, 4), rand((3, 96), F32, 5), rand((96,), F32, 6)
    out = torch.empty((3, 96))
    expected_sum = x + r
    y, s = backend.rms_norm(x, w, 1e-5, r, out=out)
    assert y is out and s is r  # the residual's storage now holds x + residual
    assert torch.equal(r, expected_sum)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    ("neox", "head_size", "rotary_dim"),
    [(True, 16, 16), (False, 16, 16), (True, 80, 40), (False, 24, 8)],
)
def test_rotary_embedding(backend, ref, dtype, neox, head_size, rotary_dim):
    hq, hkv, t = 6, 2, 7
    qkv = rand((t, (hq + 2 * hkv) * head_size), dtype, 7)
    q, k, _ = qkv.split([hq * head_size, hkv * head_size, hkv * head_size], dim=-1)
    cache = rand((64, rotary_dim), F32, 8)
    positions = torch.tensor([0, 5, 63, 1, 17, 17, 40])
    q_ref, k_ref = q.double().clone(), k.double().clone()
    ref.rotary_embedding(positions, q_ref, k_ref, cache.double(), head_size, neox)
    q_out, k_out = backend.rotary_embedding(positions, q, k, cache, head_size, neox)
    # Rotated in place, inside the fused qkv.
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert_close(q, q_ref, dtype, "elementwise")
    assert_close(k, k_ref, dtype, "elementwise")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("op", ["silu", "gelu", "gelu_tanh"])
def test_gated_activations(backend, ref, dtype, op):
    x = rand((4, 2 * 70), dtype, 9) * 3  # 70 columns: two 64-wide tiles
    if op == "silu":
        got, want = backend.silu_and_mul(x), ref.silu_and_mul(x.double())
    else:
        approx = "tanh" if op == "gelu_tanh" else "none"
        got, want = backend.gelu_and_mul(x, approx), ref.gelu_and_mul(x.double(), approx)
    assert_close(got, want, dtype, "elementwise")


def test_gelu_and_mul_rejects_unknown_approximation(backend):
    with pytest.raises(ValueError, match="approximate"):
        backend.gelu_and_mul(rand((2, 8), F32, 0), "fast")


# -------------------------------------------------------------------------------------------
# KV-cache write
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("act", "cache"), [(F32, F32), (BF16, BF16), (F16, F32)])
def test_reshape_and_cache_is_exact(backend, ref, act, cache):
    _, k_cache, v_cache, meta = attention_case([3, 1, 4], [5, 9, 4], 4, 2, 24, 4, cache, seed=10)
    meta.slot_mapping[1] = -1  # a padding token writes nothing
    kv = rand((8, 2 * 2 * 24 + 8), act, 11)
    key, value = kv[:, :48], kv[:, 48:96]  # strided views
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref.reshape_and_cache(key, value, k_ref, v_ref, meta)
    backend.reshape_and_cache(key, value, k_cache, v_cache, meta)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# -------------------------------------------------------------------------------------------
# paged attention
# -------------------------------------------------------------------------------------------

PREFILL_CASES = [
    # q_lens, seq_lens, Hq, Hkv, D, block_size, sliding_window, soft_cap
    pytest.param([5, 1, 17], [5, 9, 40], 4, 2, 24, 4, None, None, id="mixed-prefix-gqa2"),
    pytest.param([1], [1], 2, 2, 16, 16, None, None, id="one-token"),
    pytest.param([16, 17], [16, 33], 6, 2, 80, 16, None, None, id="block-boundaries-d80"),
    pytest.param([20, 3], [20, 30], 4, 1, 32, 3, None, None, id="gqa4-block3"),
    pytest.param([33], [50], 3, 3, 16, 8, 7, None, id="sliding-window"),
    pytest.param([4, 9], [4, 37], 2, 1, 32, 1, None, 5.0, id="soft-cap-block1"),
    pytest.param([0, 6], [3, 6], 2, 2, 16, 4, None, None, id="empty-chunk"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q_lens", "seq_lens", "hq", "hkv", "d", "bs", "window", "cap"), PREFILL_CASES
)
def test_paged_attention_prefill(
    backend, ref, dtype, q_lens, seq_lens, hq, hkv, d, bs, window, cap
):
    q, kc, vc, meta = attention_case(q_lens, seq_lens, hq, hkv, d, bs, dtype, seed=12)
    want = ref.paged_attention_prefill(q.double(), kc.double(), vc.double(), meta, 0.3, window, cap)
    got = backend.paged_attention_prefill(q, kc, vc, meta, 0.3, window, cap)
    assert got.dtype == dtype
    assert_close(got, want, dtype, "attention")


def test_paged_attention_fp16(backend, ref):
    q, kc, vc, meta = attention_case([7, 18], [7, 40], 4, 2, 48, 16, F16, seed=13)
    want = ref.paged_attention_prefill(q.double(), kc.double(), vc.double(), meta, 0.2)
    assert_close(backend.paged_attention_prefill(q, kc, vc, meta, 0.2), want, F16, "attention")
    q, kc, vc, meta = attention_case([1, 1], [70, 9], 4, 2, 48, 16, F16, seed=13)
    want = ref.paged_attention_decode(q.double(), kc.double(), vc.double(), meta, 0.2)
    assert_close(backend.paged_attention_decode(q, kc, vc, meta, 0.2), want, F16, "attention")


DECODE_CASES = [
    # seq_lens, Hq, Hkv, D, block_size, sliding_window, soft_cap
    pytest.param([5, 9, 40], 4, 2, 24, 4, None, None, id="gqa2"),
    pytest.param([1], 2, 2, 16, 16, None, None, id="one-token-context"),
    pytest.param([130, 3], 8, 2, 80, 16, None, None, id="long-split-d80"),
    pytest.param([100], 3, 3, 16, 8, 7, None, id="sliding-window-split"),
    pytest.param([65, 64], 4, 1, 32, 3, None, 5.0, id="soft-cap-gqa4"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("seq_lens", "hq", "hkv", "d", "bs", "window", "cap"), DECODE_CASES)
def test_paged_attention_decode(backend, ref, dtype, seq_lens, hq, hkv, d, bs, window, cap):
    q, kc, vc, meta = attention_case([1] * len(seq_lens), seq_lens, hq, hkv, d, bs, dtype, 14)
    want = ref.paged_attention_decode(q.double(), kc.double(), vc.double(), meta, 0.25, window, cap)
    got = backend.paged_attention_decode(q, kc, vc, meta, 0.25, window, cap)
    assert_close(got, want, dtype, "attention")


@pytest.mark.parametrize("splits", [1, 2, 5, 8])
def test_decode_split_k_reduction(ref, splits):
    """Any split count gives the same attention, empty splits (past a short sequence) too."""
    q, kc, vc, meta = attention_case([1, 1, 1], [150, 7, 33], 4, 2, 32, 16, F32, seed=15)
    want = ref.paged_attention_decode(q.double(), kc.double(), vc.double(), meta, 0.2)
    got = paged_attention_decode(
        q,
        kc,
        vc,
        torch.from_numpy(meta.block_tables),
        torch.from_numpy(meta.seq_lens),
        0.2,
        meta.max_seq_len,
        None,
        None,
        None,
        TEST_CONFIG,
        num_splits=splits,
    )
    assert_close(got, want, F32, "attention")


def test_decode_rejects_a_prefill_step(backend):
    q, kc, vc, meta = attention_case([2], [5], 2, 2, 16, 4, F32)
    with pytest.raises(ValueError, match="one new token"):
        backend.paged_attention_decode(q, kc, vc, meta, 0.25)


# -------------------------------------------------------------------------------------------
# sampling
# -------------------------------------------------------------------------------------------


def sampling_meta(
    rows: int, temperature: float = 1.0, top_k: int = 0, seeds: np.ndarray | None = None
) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=np.full(rows, temperature),
        top_k=np.full(rows, top_k),
        top_p=np.ones(rows),
        min_p=np.zeros(rows),
        seeds=np.arange(rows) if seeds is None else seeds,
    )


def test_sample_follows_the_distribution(backend):
    """30,000 seeded draws of a 5-token distribution: total-variation distance <= 0.01 and a
    token of probability 0 is never drawn."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.4])
    n = 30_000
    logits = torch.log(probs).repeat(n, 1)
    ids = backend.sample(logits, sampling_meta(n))
    freq = torch.bincount(ids, minlength=5).double() / n
    assert freq[3] == 0
    assert 0.5 * float((freq - probs.double()).abs().sum()) <= 0.01


def test_sample_row_depends_only_on_its_seed(backend):
    logits = rand((6, 300), F32, 16) * 2
    seeds = np.array([11, 22, 33, 44, 55, 66])
    first = backend.sample(logits, sampling_meta(6, seeds=seeds))
    order = [5, 2, 0, 4, 1, 3]
    shuffled = backend.sample(logits[order], sampling_meta(6, seeds=seeds[order]))
    assert torch.equal(shuffled, first[order])
    assert torch.equal(backend.sample(logits, sampling_meta(6, seeds=seeds)), first)


def test_sample_greedy_and_top_k(backend):
    logits = rand((4, 90), F32, 17) * 3
    meta = sampling_meta(4, top_k=3)
    meta.temperature[0] = 0.0  # one greedy row in a sampled batch
    ids = backend.sample(logits, meta)
    assert ids[0] == logits[0].argmax()
    top3 = logits.topk(3, dim=-1).indices
    assert all(int(ids[b]) in top3[b].tolist() for b in range(4))
    greedy = backend.sample(logits, sampling_meta(4, temperature=0.0))
    assert torch.equal(greedy, logits.argmax(dim=-1))


# -------------------------------------------------------------------------------------------
# what the backend claims
# -------------------------------------------------------------------------------------------


def test_supports_and_native_ops(backend):
    assert backend.supports("paged_attention_decode", DType.BF16, head_size=128)
    assert not backend.supports("paged_attention_decode", DType.BF16, head_size=512)
    assert not backend.supports("rms_norm", DType.FP64)
    assert backend.native_ops() >= {
        "linear",
        "rms_norm",
        "rotary_embedding",
        "reshape_and_cache",
        "silu_and_mul",
        "gelu_and_mul",
        "paged_attention_prefill",
        "paged_attention_decode",
        "sample",
    }


def test_fp8_kv_cache_needs_an_fp8_device(backend):
    with pytest.raises(ValueError, match="cannot hold a KV cache"):
        backend.allocate_kv_cache(4, 16, 2, 64, DType.FP8_E4M3FN)
