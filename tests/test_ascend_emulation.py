"""The Ascend backend's layouts, masks and lengths, checked numerically on CPU by EMULATION.

The npu operators get CPU kernels that follow torch-npu's documentation
(``support.ascend_emulation``; they also refuse what the docs say the device refuses). The
backend's own operator code then runs on CPU tensors and is compared with the reference
backend in float64, with the conformance tolerances of facts.md. This checks what the backend
hands the NPU (cumulative vs per-sequence lengths, the causal and band masks, block tables,
padding slots, transposed and packed weights); it does not check the NPU's arithmetic.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import numpy as np
import pytest
import torch
from llm_core_ascend.backend import AscendBackend
from llm_core_ascend.ops import TORCH_NPU_VERSION
from llm_hal import AttentionMetadata, DType, QuantScheme, TorchBackend
from support import ascend_emulation as emulation
from support import ascend_schemas as schemas
from support.numerics import assert_close

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(scope="module")
def npu() -> Any:
    if "torch_npu" in sys.modules:
        pytest.skip("a real torch-npu is loaded in this process")
    try:
        wheel = schemas.find_wheel()
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"the torch-npu {TORCH_NPU_VERSION} wheel cannot be had here: {exc}")
    return schemas.register(schemas.read_wheel(wheel), cpu_kernels=emulation.KERNELS)


@pytest.fixture
def backend(npu: Any) -> AscendBackend:
    return AscendBackend("cpu", ops=npu)


REF = TorchBackend("cpu")


def rand(*shape: int, dtype: torch.dtype = BF16, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check(actual: torch.Tensor, golden: torch.Tensor, op_class: str) -> None:
    """``golden`` is the float64 reference; the tolerance table's entry for ``op_class`` and
    the dtype of ``actual`` must hold: elementwise and NMSE."""
    assert_close(actual, golden.double(), op_class, actual.dtype)


# -------------------------------------------------------------------------------------------
# normalization and activation
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_rms_norm(backend: AscendBackend, dtype: torch.dtype) -> None:
    x, w, r = (
        rand(6, 64, dtype=dtype),
        rand(64, dtype=dtype, seed=1),
        rand(6, 64, dtype=dtype, seed=2),
    )
    y, none = backend.rms_norm(x, w, 1e-5)
    assert none is None
    check(y, REF.rms_norm(x.double(), w.double(), 1e-5)[0], "norm")
    y, s = backend.rms_norm(x, w, 1e-5, residual=r)
    golden_y, _ = REF.rms_norm(x.double(), w.double(), 1e-5, residual=r.double())
    check(y, golden_y, "norm")
    assert s is not None and torch.equal(
        s, (x.float() + r.float()).to(dtype)
    )  # the sum, rounded once
    out = torch.empty_like(x)
    assert backend.rms_norm(x, w, 1e-5, out=out)[0] is out
    check(out, REF.rms_norm(x.double(), w.double(), 1e-5)[0], "norm")


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_silu_and_mul(backend: AscendBackend, dtype: torch.dtype) -> None:
    x = rand(5, 96, dtype=dtype)
    check(backend.silu_and_mul(x), REF.silu_and_mul(x.double()), "elementwise")


# -------------------------------------------------------------------------------------------
# rotary embedding: in place, on the strided q and k views of a qkv projection
# -------------------------------------------------------------------------------------------


def _cos_sin(rot: int, positions: int = 64) -> torch.Tensor:
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()  # (P, R)


@pytest.mark.parametrize(
    ("head_size", "rot", "neox", "dtype"),
    [
        (64, 64, True, BF16),  # npu_apply_rotary_pos_emb
        (128, 128, True, FP16),  # npu_apply_rotary_pos_emb
        (64, 32, True, BF16),  # partial rotary: npu_rotary_mul on the first 32 features
        (64, 64, False, BF16),  # GPT-J pairs: npu_rotary_mul, interleave mode
        (16, 16, True, FP32),  # a head size the fused op does not take
    ],
)
def test_rotary_embedding(
    backend: AscendBackend, head_size: int, rot: int, neox: bool, dtype: torch.dtype
) -> None:
    t, hq, hkv, d = 7, 4, 2, head_size
    qkv = rand(t, (hq + 2 * hkv) * d, dtype=dtype)
    golden = qkv.double()
    positions = torch.tensor([0, 1, 2, 9, 33, 5, 63])
    cache = _cos_sin(rot)
    q, k, v = backend.split(qkv, [hq * d, hkv * d, hkv * d])
    gq, gk, _ = REF.split(golden, [hq * d, hkv * d, hkv * d])
    v_before = v.clone()
    rq, rk = backend.rotary_embedding(positions, q, k, cache, d, neox)
    REF.rotary_embedding(positions, gq, gk, cache.double(), d, neox)
    assert rq.data_ptr() == q.data_ptr() and rk.data_ptr() == k.data_ptr()  # in place
    check(qkv, golden, "rotary")
    assert torch.equal(v, v_before)


# -------------------------------------------------------------------------------------------
# the paged KV cache and attention
# -------------------------------------------------------------------------------------------


def _batch(
    cached: list[int], new: list[int], block_size: int, padding: int = 0, seed: int = 0
) -> AttentionMetadata:
    """Sequences with ``cached[b]`` tokens already in the cache and ``new[b]`` new ones, in
    shuffled blocks; table entries past a sequence's blocks hold junk (the engine may leave
    anything there); ``padding`` trailing tokens with slot -1."""
    rng = np.random.default_rng(seed)
    lens = [c + n for c, n in zip(cached, new)]
    needs = [-(-n // block_size) for n in lens]
    width = max(needs) + 1
    order = rng.permutation(sum(needs))
    tables = np.full((len(lens), width), 10_000, dtype=np.int32)
    at = 0
    for b, n in enumerate(needs):
        tables[b, :n] = order[at : at + n]
        at += n
    slots = [
        int(tables[b, p // block_size]) * block_size + p % block_size
        for b in range(len(lens))
        for p in range(cached[b], lens[b])
    ]
    starts = np.concatenate([[0], np.cumsum(new)])
    starts[-1] += padding
    seq = np.array(lens)
    seq[-1] += padding
    return AttentionMetadata(starts, seq, tables, np.array(slots + [-1] * padding), block_size)


def _filled_cache(
    meta: AttentionMetadata, hkv: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = int(meta.block_tables[meta.block_tables < 10_000].max()) + 1
    shape = (blocks, meta.block_size, hkv, d)
    return rand(*shape, dtype=dtype, seed=10), rand(*shape, dtype=dtype, seed=11)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_reshape_and_cache_is_exact(backend: AscendBackend, dtype: torch.dtype) -> None:
    hkv, d = 2, 64
    meta = _batch([0, 130, 5], [4, 3, 1], 128, padding=2)
    kc, vc = _filled_cache(meta, hkv, d, BF16)
    ref_k, ref_v = kc.clone(), vc.clone()
    kv = rand(meta.num_tokens, 3 * hkv * d, dtype=dtype, seed=3)
    _, k, v = backend.split(kv, [hkv * d, hkv * d, hkv * d])  # strided, maybe another dtype
    backend.reshape_and_cache(k, v, kc, vc, meta)
    REF.reshape_and_cache(k, v, ref_k, ref_v, meta)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    assert not torch.equal(kc, _filled_cache(meta, hkv, d, BF16)[0])  # something was written


GQA, MHA, MQA = (8, 2, 64), (4, 4, 128), (6, 1, 32)  # (Hq, Hkv, D)


@pytest.mark.parametrize(
    ("dtype", "heads", "window"),
    [(BF16, GQA, None), (FP16, MHA, 5), (BF16, MQA, 5), (FP16, GQA, None)],
)
def test_paged_attention_prefill(
    backend: AscendBackend, dtype: torch.dtype, heads: tuple[int, int, int], window: int | None
) -> None:
    hq, hkv, d = heads
    # A chunk after a cached prefix across a block boundary, a fresh prompt, one token.
    meta = _batch([130, 0, 7], [6, 5, 1], 128, seed=1)
    kc, vc = _filled_cache(meta, hkv, d, dtype)
    q = rand(meta.num_tokens, hq * d, dtype=dtype, seed=4)
    got = backend.paged_attention_prefill(q, kc, vc, meta, d**-0.5, sliding_window=window)
    golden = REF.paged_attention_prefill(
        q.double(), kc.double(), vc.double(), meta, d**-0.5, sliding_window=window
    )
    check(got, golden, "attention")


@pytest.mark.parametrize(
    ("dtype", "heads", "block_size", "window"),
    [(BF16, GQA, 16, None), (FP16, MHA, 128, None), (BF16, MQA, 16, 20), (FP16, GQA, 128, 20)],
)
def test_paged_attention_decode(
    backend: AscendBackend,
    dtype: torch.dtype,
    heads: tuple[int, int, int],
    block_size: int,
    window: int | None,
) -> None:
    hq, hkv, d = heads
    meta = _batch([0, 16, 299], [1, 1, 1], block_size, seed=2)
    kc, vc = _filled_cache(meta, hkv, d, dtype)
    q = rand(3, hq * d, dtype=dtype, seed=5)
    got = backend.paged_attention_decode(q, kc, vc, meta, d**-0.5, sliding_window=window)
    golden = REF.paged_attention_decode(
        q.double(), kc.double(), vc.double(), meta, d**-0.5, sliding_window=window
    )
    check(got, golden, "attention")


def test_attention_writes_into_out(backend: AscendBackend) -> None:
    meta = _batch([0, 3], [4, 1], 128)
    kc, vc = _filled_cache(meta, 2, 64, BF16)
    q = rand(meta.num_tokens, 4 * 64)
    out = torch.empty_like(q)
    assert backend.paged_attention_prefill(q, kc, vc, meta, 0.125, out=out) is out
    check(
        out,
        REF.paged_attention_prefill(q.double(), kc.double(), vc.double(), meta, 0.125),
        "attention",
    )


def test_unfused_attention_is_the_reference(
    backend: AscendBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """fp32 and block size 16 prefill take the reference code, and the log says why."""
    meta = _batch([20, 0], [3, 4], 16)
    kc, vc = _filled_cache(meta, 2, 64, FP32)
    q = rand(meta.num_tokens, 4 * 64, dtype=FP32)
    with caplog.at_level(logging.WARNING, logger="llm_core_ascend.backend"):
        got = backend.paged_attention_prefill(q, kc, vc, meta, 0.125)
    assert torch.equal(got, REF.paged_attention_prefill(q, kc, vc, meta, 0.125))
    assert "unfused" in caplog.text and "float32" in caplog.text


# -------------------------------------------------------------------------------------------
# linear layers: dense (ND and NZ) and quantized
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nz", [False, True])
def test_dense_linear(npu: Any, nz: bool) -> None:
    backend = AscendBackend("cpu", ops=npu, nz_weights=nz)
    w, b, x = rand(48, 64, seed=1), rand(48, seed=2), rand(5, 64, seed=3)
    lw = backend.prepare_linear(w, b)
    assert (lw.packed is not None) == nz
    golden = REF.linear(x.double(), REF.prepare_linear(w.double(), b.double()))
    check(backend.linear(x, lw), golden, "linear")


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize(
    ("scheme", "group"),
    [
        (QuantScheme.W8A16, 0),
        (QuantScheme.W8A16, 32),
        (QuantScheme.W4A16, 64),
        (QuantScheme.W4A16, 0),
        (QuantScheme.W8A8, 0),
    ],
)
def test_quantized_linear(
    backend: AscendBackend, dtype: torch.dtype, scheme: QuantScheme, group: int
) -> None:
    n, k = 48, 128
    g = torch.Generator().manual_seed(7)
    groups = k // group if group else 1
    zeros = None
    if scheme is QuantScheme.W4A16:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        zeros = torch.randint(0, 16, (n, groups), generator=g).float()
    else:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.005
    bias = rand(n, dtype=dtype, seed=8)
    x = rand(9, k, dtype=dtype, seed=9)
    lw = backend.prepare_linear(w, bias, scheme, scales, zeros, group)
    assert lw.packed is not None  # the NPU form, not the reference path
    golden_w = REF.prepare_linear(w, bias.double(), scheme, scales.double(), zeros, group)
    golden = REF.linear(x.double(), golden_w)
    got = backend.linear(x, lw)
    assert got.dtype == dtype and got.shape == (9, n)
    check(got, golden, "quantized")  # mean relative error and NMSE, for every scheme
    if scheme is QuantScheme.W8A8:
        check(got, golden, "w8a8")  # and W8A8's own elementwise bound


def test_quantized_linear_in_fp32_is_the_reference(backend: AscendBackend) -> None:
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8, generator=torch.Generator())
    scales = torch.rand(16, 1) + 0.1
    x = rand(3, 64, dtype=FP32)
    lw = backend.prepare_linear(w, None, QuantScheme.W8A8, scales)
    assert torch.equal(
        backend.linear(x, lw), REF.linear(x, REF.prepare_linear(w, None, QuantScheme.W8A8, scales))
    )


# -------------------------------------------------------------------------------------------
# the emulation's own checks bite
# -------------------------------------------------------------------------------------------


def test_emulation_refuses_what_the_docs_refuse(npu: Any) -> None:
    q = rand(4, 2, 64)
    kv = rand(2, 128, 2 * 64)
    table = torch.zeros(1, 1, dtype=torch.int32)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    kw: dict[str, Any] = dict(
        atten_mask=mask,
        actual_seq_lengths=[4],
        actual_seq_lengths_kv=[4],
        block_table=table,
        num_heads=2,
        input_layout="TND",
        num_key_value_heads=2,
        sparse_mode=3,
        block_size=128,
    )
    npu.npu_fused_infer_attention_score(q, kv, kv, **kw)
    with pytest.raises(RuntimeError, match="contiguous"):
        npu.npu_fused_infer_attention_score(
            q.transpose(0, 1).contiguous().transpose(0, 1), kv, kv, **kw
        )
    with pytest.raises(RuntimeError, match="cumulative"):
        npu.npu_fused_infer_attention_score(q, kv, kv, **{**kw, "actual_seq_lengths": [3]})
    with pytest.raises(RuntimeError, match="2048x2048"):
        npu.npu_fused_infer_attention_score(q, kv, kv, **{**kw, "atten_mask": ~mask})
    with pytest.raises(RuntimeError, match="multiple of 128"):
        small = rand(8, 16, 2 * 64)
        npu.npu_fused_infer_attention_score(q, small, small, **{**kw, "block_size": 16})
    cache = torch.zeros(1, 16, 2, 64, dtype=BF16)
    k = rand(2, 2, 64)
    with pytest.raises(RuntimeError, match="Norm"):
        npu.npu_scatter_pa_kv_cache(k, k, cache, cache, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="slots"):
        npu.npu_scatter_pa_kv_cache(k, k, cache, cache, torch.tensor([0, -1]), cache_mode="Norm")
    with pytest.raises(RuntimeError, match="gamma"):
        npu.npu_rms_norm(rand(2, 64), rand(64, dtype=FP32))


# -------------------------------------------------------------------------------------------
# a whole model: the decoder's operator sequence through the emulated backend
# -------------------------------------------------------------------------------------------


def _tiny_model_logits(hf: Any, backend: Any, dtype: DType) -> torch.Tensor:
    """Logits of a prefill of two prompts and one decode step, with block size 128."""
    from llm_core.models.base import ForwardBatch
    from llm_core.models.registry import ARCHITECTURES

    model = ARCHITECTURES[type(hf).__name__](hf.config, backend, dtype)
    model.load_weights((n, t.detach()) for n, t in hf.state_dict().items())
    block_size = 128
    caches = [
        backend.allocate_kv_cache(2, block_size, model.num_kv_heads, model.head_size, dtype)
        for _ in range(model.num_layers)
    ]
    prompts = [[5, 9, 13, 2, 7, 11], [3, 4]]
    lens = [len(p) for p in prompts]
    tables = np.array([[0], [1]])
    slots = [b * block_size + i for b, n in enumerate(lens) for i in range(n)]
    prefill = AttentionMetadata(
        np.array([0, lens[0], sum(lens)]), np.array(lens), tables, np.array(slots), block_size
    )
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for n in lens for i in range(n)])
    last = torch.tensor([lens[0] - 1, sum(lens) - 1])
    first = model.forward(ForwardBatch(ids, positions, prefill, last, positions), caches)
    decode = AttentionMetadata(
        np.array([0, 1, 2]),
        np.array(lens) + 1,
        tables,
        np.array([lens[0], block_size + lens[1]]),
        block_size,
    )
    pos = torch.tensor(lens)
    step = model.forward(
        ForwardBatch(torch.tensor([17, 23]), pos, decode, torch.arange(2), pos), caches
    )
    return torch.cat((first, step)).double()  # (4, V)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_is_as_close_to_fp32_as_the_reference_in_bf16(npu: Any, arch: str) -> None:
    """The decoder's whole operator sequence (fused norms with residuals, rotary on the qkv
    views, per-head q/k norms for qwen3, cache writes, prefill and decode attention) in bf16
    through the emulated backend: no further from the fp32 reference than the reference
    backend itself is in bf16 (facts.md: compare with the reference's own noise)."""
    from conftest_loaders import tiny_model

    hf = tiny_model(arch, logit_scale=25.0)
    golden = _tiny_model_logits(hf, REF, DType.FP32)
    ascend = _tiny_model_logits(hf, AscendBackend("cpu", ops=npu), DType.BF16)
    noise = (_tiny_model_logits(hf, REF, DType.BF16) - golden).abs().max()
    assert (ascend - golden).abs().max() <= 2 * noise
    assert float(torch.nn.functional.cosine_similarity(ascend, golden, dim=-1).min()) > 0.9999
    top2 = golden.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1  # rows without a near tie must agree on top-1
    assert torch.equal(ascend.argmax(-1)[clear], golden.argmax(-1)[clear])
