"""Every operator of the OpenCL backend against the reference run in float64 (PoCL here).

The cases and inputs are those of test_ops_cpu.py (imported from it), the bounds those of the
conformance suite's tolerance table (``support.numerics.assert_close``): seeded values rounded
to the tested dtype, the elementwise check AND the NMSE cap, NaN/Inf parity. "Strided"
inputs come from the backend's own ``split`` of a wider tensor. ``out`` checks write into a
view at an offset inside a guarded buffer, so a write past either end is caught. fp16 (storage
only on PoCL) is checked on the hot operators with the fp16 column of the tolerance table.

Skipped, with the reason, where pyopencl or an OpenCL device is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import llm_hal.reference
import numpy as np
import pytest
import torch
from llm_hal import AttentionMetadata, DType, PenaltyMetadata, QuantScheme, SamplingMetadata
from llm_hal import TorchBackend as Reference
from llm_hal.backend import MemoryInfo
from support.numerics import assert_close
from test_ops_cpu import (
    ACT_SHAPES,
    BF16,
    BITMASK_SHAPES,
    DECODE_CASES,
    DTYPES,
    F32,
    F64,
    GEMMA_NORM_SHAPES,
    LINEAR_SHAPES,
    LOGIT_SHAPES,
    NORM_SHAPES,
    PREFILL_CASES,
    SCALE_FACTORS,
    SOFT_CAP_SCALES,
    VARIANTS,
    Attn,
    _attention_case_params,
    _cos_sin_cache,
    _rand,
    _sampling_meta,
    _seeded,
    _token_bitmask,
)

pytest.importorskip("pyopencl", reason="pyopencl is not installed (pip install 'llm-core[opencl]')")

F16 = torch.float16
Array = Any  # pyopencl.array.Array


@pytest.fixture(scope="module")
def ocl() -> Any:
    from llm_core_opencl.backend import OpenCLBackend
    from llm_core_opencl.device import DeviceSelectionError

    try:
        return OpenCLBackend()
    except DeviceSelectionError as exc:
        pytest.skip(f"no OpenCL device: {exc}")


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("cpu")


def _strided(ocl: Any, gen: torch.Generator, rows: int, width: int, dtype: torch.dtype,
             extra: int = 24) -> tuple[Array, torch.Tensor]:  # fmt: skip
    """(rows, width) from the backend's split of a wider tensor, and its float64 values."""
    full, full64 = _rand(gen, (rows, width + extra), dtype)
    part, _ = ocl.split(ocl.from_host(full), [width, extra])
    return part, full64[:, :width]


def _check_out(
    ocl: Any,
    call: Callable[[Array], Any],
    expected: torch.Tensor,
    pick: Callable[[Any], Any] | None = None,
) -> None:
    """``call(out)`` must return ``out`` and fill it with ``expected``, for an ``out`` that
    starts its buffer and for one at an offset between two guard rows that must stay intact."""
    plain = ocl.empty(tuple(expected.shape), DType.parse(expected.dtype))
    result = call(plain)
    assert (pick(result) if pick else result) is plain
    assert torch.equal(ocl.to_host(plain), expected)
    guard = torch.full((expected.shape[0] + 2, *expected.shape[1:]), 1234.5, dtype=expected.dtype)
    big = ocl.from_host(guard)
    view = big[1:-1]
    result = call(view)
    assert (pick(result) if pick else result) is view
    got = ocl.to_host(big)
    assert torch.equal(got[1:-1], expected)
    assert torch.equal(got[0], guard[0]) and torch.equal(got[-1], guard[-1])


# -------------------------------------------------------------------------------------------
# device and memory
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64, torch.int64, torch.int32, torch.int8,
                                   torch.uint8, torch.bool])  # fmt: skip
def test_host_round_trip_is_exact(ocl: Any, dtype: torch.dtype) -> None:
    x = (torch.randn((5, 7), generator=_seeded("trip", dtype), dtype=F64) * 50).to(dtype)
    dev = ocl.from_host(x)
    assert ocl.dtype_of(dev) is DType.parse(dtype)
    assert tuple(dev.shape) == (5, 7)
    back = ocl.to_host(dev)
    assert back.dtype == dtype and torch.equal(back, x)
    if dtype != BF16:  # numpy input (numpy has no bf16)
        assert torch.equal(ocl.to_host(ocl.from_host(x.numpy())), x)
    assert torch.equal(ocl.to_host(x), x)  # a host tensor is copied as it is


@pytest.mark.parametrize("src", [F32, F16, BF16, F64])
@pytest.mark.parametrize("dst", [F32, F16, BF16])
def test_conversions_round_like_torch(ocl: Any, src: torch.dtype, dst: torch.dtype) -> None:
    x = (torch.randn((3, 33), generator=_seeded("conv", src, dst), dtype=F64) * 7).to(src)
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0], dtype=src)
    want = x.to(dst)
    got_host = ocl.to_host(ocl.from_host(x, DType.parse(dst)))  # converted on the host
    got_dev = ocl.to_host(ocl.copy_(ocl.empty((3, 33), DType.parse(dst)), ocl.from_host(x)))
    for got in (got_host, got_dev):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~want.isnan()], want[~want.isnan()])


def test_memory_ops(ocl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.arange(24, dtype=F32).reshape(4, 6)
    dev = ocl.from_host(x)
    assert torch.equal(ocl.to_host(ocl.reshape(dev, (2, -1))), x.reshape(2, 12))
    parts = ocl.split(dev, [1, 3, 2])
    for got, want in zip(parts, torch.split(x, [1, 3, 2], -1), strict=True):
        assert torch.equal(ocl.to_host(got), want)
    dst = ocl.empty((4, 6), DType.FP32)
    assert ocl.copy_(dst, dev) is dst and torch.equal(ocl.to_host(dst), x)
    k, v = ocl.allocate_kv_cache(3, 4, 2, 8, DType.BF16)
    assert ocl.dtype_of(k) is DType.BF16 and tuple(v.shape) == (3, 4, 2, 8)
    assert not bool(ocl.to_host(k).any()) and not bool(ocl.to_host(v).any())
    ocl.synchronize()
    info, mem = ocl.device_info(), ocl.memory_info()
    assert mem.total == info.total_memory > 0 and 0 < mem.free <= mem.total
    # What the backend hands out is not free, and what it gets back is free again. On a CPU
    # device `free` is also capped by the host's available memory, which other processes move
    # at any moment (a busy machine failed this test): the cap is pinned to the device's
    # total here, so that only the backend's own accounting moves `free`.
    unbounded = MemoryInfo(total=mem.total, free=mem.total)
    monkeypatch.setattr(llm_hal.reference, "host_memory_info", lambda: unbounded)
    before = ocl.memory_info().free
    assert before < mem.total  # the tensors above are held
    big = ocl.empty((64 << 20,), DType.UINT8)
    assert ocl.memory_info().free == before - (64 << 20)
    del big
    assert ocl.memory_info().free == before


def test_supports_is_honest(ocl: Any) -> None:
    native = {"embedding", "linear", "rms_norm", "gemma_rms_norm", "layer_norm",
              "rotary_embedding", "reshape_and_cache", "paged_attention_prefill",
              "paged_attention_decode", "silu_and_mul", "gelu_and_mul", "gelu", "add", "scale",
              "soft_cap", "gather_rows", "apply_penalties", "apply_token_bans",
              "apply_token_bitmask", "sample", "compute_logprobs"}  # fmt: skip
    assert ocl.native_ops() == native
    for op in ("moe_route", "moe_experts", "all_reduce", "all_gather"):
        assert not ocl.supports(op)
    assert ocl.supports("linear", DType.BF16) and ocl.supports("linear", DType.FP16)
    assert not ocl.supports("linear", DType.FP64)
    assert not ocl.supports("linear", DType.FP32, scheme=QuantScheme.W8A16)
    assert not ocl.supports("sample", DType.BF16) and ocl.supports("sample", DType.FP32)
    assert ocl.supports("paged_attention_decode", DType.FP32, head_size=256)
    assert not ocl.supports("paged_attention_decode", DType.FP32, head_size=1024)
    w = ocl.from_host(torch.zeros((4, 8), dtype=torch.int8))
    with pytest.raises(Exception, match="does not support operator linear"):
        ocl.prepare_linear(w, None, QuantScheme.W8A16, w, None, 0)


# -------------------------------------------------------------------------------------------
# embedding, linear
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("vocab", "tokens", "hidden"), [(1, 1, 8), (7, 5, 80), (50, 33, 96)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_embedding(
    ocl: Any, ref: Reference, dtype: torch.dtype, vocab: int, tokens: int, hidden: int,
    id_dtype: torch.dtype,
) -> None:  # fmt: skip
    gen = _seeded("embedding", vocab, tokens, hidden)
    table, table64 = _rand(gen, (vocab, hidden), dtype)
    ids = torch.randint(0, vocab, (tokens,), generator=gen, dtype=id_dtype)
    d_table, d_ids = ocl.from_host(table), ocl.from_host(ids)
    got = ocl.to_host(ocl.embedding(d_ids, d_table))
    assert got.dtype == dtype
    assert_close(got, ref.embedding(ids, table64), "exact", dtype)
    _check_out(ocl, lambda out: ocl.embedding(d_ids, d_table, out=out), got)


# GEMV (<= 4 rows) and GEMM, inside one tile and across tile edges in every dimension.
OCL_LINEAR_SHAPES = [*LINEAR_SHAPES, (4, 36, 20), (65, 33, 130), (70, 200, 64)]


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(F16, id="fp16")])
@pytest.mark.parametrize(("tokens", "k", "n"), OCL_LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_linear_dense(
    ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, k: int, n: int, bias: bool,
    strided: bool,
) -> None:  # fmt: skip
    gen = _seeded("linear", tokens, k, n, bias, strided)
    if strided:
        x, x64 = _strided(ocl, gen, tokens, k, dtype)
    else:
        xh, x64 = _rand(gen, (tokens, k), dtype)
        x = ocl.from_host(xh)
    w, w64 = _rand(gen, (n, k), dtype, 1 / math.sqrt(k))
    b, b64 = _rand(gen, (n,), dtype) if bias else (None, None)
    weight = ocl.prepare_linear(ocl.from_host(w), None if b is None else ocl.from_host(b))
    got = ocl.to_host(ocl.linear(x, weight))
    assert got.dtype == dtype
    want = ref.linear(x64, ref.prepare_linear(w64, b64))
    assert_close(got, want, "linear", dtype)
    _check_out(ocl, lambda out: ocl.linear(x, weight, out=out), got)


@pytest.fixture(scope="module")
def ocl_gpu_kernels(ocl: Any) -> Any:
    """The same device running the GPU flavour of the kernels (tiled GEMM, cooperative GEMV),
    so that they are checked here too."""
    from llm_core_opencl.backend import OpenCLBackend

    return OpenCLBackend(flavour="gpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "k", "n"), OCL_LINEAR_SHAPES)
def test_linear_gpu_flavour(
    ocl_gpu_kernels: Any, ref: Reference, dtype: torch.dtype, tokens: int, k: int, n: int
) -> None:
    be = ocl_gpu_kernels
    gen = _seeded("linear-gpu", tokens, k, n)
    x, x64 = _rand(gen, (tokens, k), dtype)
    w, w64 = _rand(gen, (n, k), dtype, 1 / math.sqrt(k))
    b, b64 = _rand(gen, (n,), dtype)
    weight = be.prepare_linear(be.from_host(w), be.from_host(b))
    got = be.to_host(be.linear(be.from_host(x), weight))
    assert_close(got, ref.linear(x64, ref.prepare_linear(w64, b64)), "linear", dtype)


# -------------------------------------------------------------------------------------------
# norms
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(F16, id="fp16")])
@pytest.mark.parametrize(("tokens", "hidden"), NORM_SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(
    ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, hidden: int, residual: bool
) -> None:
    gen = _seeded("rms", tokens, hidden, residual)
    x, x64 = _strided(ocl, gen, tokens, hidden, dtype)
    w, w64 = _rand(gen, (hidden,), dtype)
    r, r64 = _rand(gen, (tokens, hidden), dtype) if residual else (None, None)
    x_before = ocl.to_host(x)
    d_w = ocl.from_host(w)
    d_r = None if r is None else ocl.from_host(r)
    y, s = ocl.rms_norm(x, d_w, 1e-6, residual=d_r)
    y_ref, s_ref = ref.rms_norm(x64, w64, 1e-6, residual=r64)
    got = ocl.to_host(y)
    assert got.dtype == dtype
    assert_close(got, y_ref, "norm", dtype)
    if residual:
        assert s is not None and ocl.dtype_of(s) is DType.parse(dtype)
        assert s_ref is not None and r64 is not None
        s_host = ocl.to_host(s)
        assert_close(s_host, s_ref, "elementwise", dtype)
        assert torch.equal(s_host, (x64 + r64).to(dtype))  # one rounding of the exact sum
    else:
        assert s is None
    assert torch.equal(ocl.to_host(x), x_before)
    if not residual:  # with a residual the call rewrites it, so a second call would differ
        _check_out(ocl, lambda out: ocl.rms_norm(x, d_w, 1e-6, out=out), got, lambda res: res[0])


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(F16, id="fp16")])
@pytest.mark.parametrize(("tokens", "hidden"), GEMMA_NORM_SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gemma_rms_norm(
    ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, hidden: int, residual: bool
) -> None:
    gen = _seeded("gemma_rms", tokens, hidden, residual)
    x, x64 = _strided(ocl, gen, tokens, hidden, dtype)
    w, w64 = _rand(gen, (hidden,), dtype, 0.5)
    r, r64 = _rand(gen, (tokens, hidden), dtype) if residual else (None, None)
    x_before = ocl.to_host(x)
    d_w = ocl.from_host(w)
    y, s = ocl.gemma_rms_norm(x, d_w, 1e-6, residual=None if r is None else ocl.from_host(r))
    s64 = x64 if r64 is None else (x64 + r64).to(dtype).double()  # one rounding of the sum
    got = ocl.to_host(y)
    assert got.dtype == dtype
    assert_close(got, ref.gemma_rms_norm(s64, w64, 1e-6)[0], "norm", dtype)
    if residual:
        assert s is not None and ocl.dtype_of(s) is DType.parse(dtype)
        assert torch.equal(ocl.to_host(s), s64.to(dtype))
    else:
        assert s is None
    assert torch.equal(ocl.to_host(x), x_before)
    if not residual:  # with a residual the call rewrites it, so a second call would differ
        _check_out(ocl, lambda out: ocl.gemma_rms_norm(x, d_w, 1e-6, out=out), got,
                   lambda res: res[0])  # fmt: skip


@pytest.mark.parametrize("weight_dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_gemma_rms_norm_takes_the_weight_as_it_is(
    ocl: Any, ref: Reference, dtype: torch.dtype, weight_dtype: torch.dtype
) -> None:
    """(1 + w) is formed from the weight in its own dtype, not from w rounded to x's."""
    gen = _seeded("gemma_rms_weight", dtype, weight_dtype)
    x, _ = _rand(gen, (5, 96), dtype)
    w = torch.randn((96,), generator=gen, dtype=F64).to(weight_dtype) * 0.3 + 1e-3
    got = ocl.to_host(ocl.gemma_rms_norm(ocl.from_host(x), ocl.from_host(w), 1e-6)[0])
    want = ref.gemma_rms_norm(x.double(), w.float().double(), 1e-6)[0]
    assert_close(got, want, "norm", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), NORM_SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm(
    ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, hidden: int, bias: bool
) -> None:
    gen = _seeded("layer_norm", tokens, hidden, bias)
    x, x64 = _rand(gen, (tokens, hidden), dtype, 3.0)
    w, w64 = _rand(gen, (hidden,), dtype)
    b, b64 = _rand(gen, (hidden,), dtype) if bias else (None, None)
    args = (ocl.from_host(x), ocl.from_host(w), None if b is None else ocl.from_host(b), 1e-5)
    got = ocl.to_host(ocl.layer_norm(*args))
    assert_close(got, ref.layer_norm(x64, w64, b64, 1e-5), "norm", dtype)
    _check_out(ocl, lambda out: ocl.layer_norm(*args, out=out), got)


# -------------------------------------------------------------------------------------------
# rotary embedding
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hq", "hkv", "d", "rot"),
    [(1, 4, 4, 64, 64), (7, 6, 2, 80, 80), (5, 8, 2, 96, 48), (33, 9, 3, 64, 32)],
)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rotary_embedding(
    ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, hq: int, hkv: int, d: int,
    rot: int, neox: bool,
) -> None:  # fmt: skip
    gen = _seeded("rotary", tokens, hq, hkv, d, rot, neox)
    cache = _cos_sin_cache(4096, rot)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    qkv, qkv64 = _rand(gen, (tokens, (hq + 2 * hkv) * d), dtype)
    q, k, v = ocl.split(ocl.from_host(qkv), [hq * d, hkv * d, hkv * d])
    q64, k64, v64 = torch.split(qkv64, [hq * d, hkv * d, hkv * d], -1)
    rq, rk = ocl.rotary_embedding(ocl.from_host(positions), q, k, ocl.from_host(cache), d, neox)
    ref.rotary_embedding(positions, q64, k64, cache, d, neox)
    assert rq is q and rk is k  # in place
    assert_close(ocl.to_host(q), q64, "rotary", dtype)
    assert_close(ocl.to_host(k), k64, "rotary", dtype)
    assert torch.equal(ocl.to_host(v), v64.to(dtype))


# -------------------------------------------------------------------------------------------
# KV cache and paged attention
# -------------------------------------------------------------------------------------------


def _attention_inputs(
    ocl: Any, case: Attn, dtype: torch.dtype, gen: torch.Generator
) -> dict[str, Any]:
    meta, num_blocks = case.metadata(gen)
    cache_shape = (num_blocks, case.block_size, case.hkv, case.d)
    kc, kc64 = _rand(gen, cache_shape, dtype)
    vc, vc64 = _rand(gen, cache_shape, dtype)
    width = case.hq * case.d
    if case.strided:
        q, q64 = _strided(ocl, gen, meta.num_tokens, width, dtype, extra=2 * case.hkv * case.d)
    else:
        qh, q64 = _rand(gen, (meta.num_tokens, width), dtype)
        q = ocl.from_host(qh)
    return {"meta": meta, "ocl": (q, ocl.from_host(kc), ocl.from_host(vc)),
            "ref": (q64, kc64, vc64)}  # fmt: skip


def _run_attention(
    ocl: Any, ref: Reference, op: str, case: Attn, variant: str, dtype: torch.dtype
) -> None:
    inputs = _attention_inputs(ocl, case, dtype, _seeded(op, str(case), variant))
    window, cap = VARIANTS[variant]
    scale = 1 / math.sqrt(case.d)
    meta = inputs["meta"]
    got = ocl.to_host(getattr(ocl, op)(*inputs["ocl"], meta, scale, window, cap))
    want = getattr(ref, op)(*inputs["ref"], meta, scale, window, cap)
    assert got.dtype == dtype
    assert_close(got, want, "attention", dtype)
    _check_out(ocl, lambda out: getattr(ocl, op)(*inputs["ocl"], meta, scale, window, cap,
                                                 out=out), got)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "variant"), _attention_case_params(PREFILL_CASES))
def test_paged_attention_prefill(
    ocl: Any, ref: Reference, dtype: torch.dtype, case: Attn, variant: str
) -> None:
    _run_attention(ocl, ref, "paged_attention_prefill", case, variant, dtype)


# Decode cases of the CPU suite plus a head size of 256 and a long context.
OCL_DECODE_CASES = [*DECODE_CASES, Attn([(9, 1), (1000, 1)], 16, 4, 2, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "variant"), _attention_case_params(OCL_DECODE_CASES))
def test_paged_attention_decode(
    ocl: Any, ref: Reference, dtype: torch.dtype, case: Attn, variant: str
) -> None:
    _run_attention(ocl, ref, "paged_attention_decode", case, variant, dtype)


@pytest.mark.parametrize("op", ["paged_attention_prefill", "paged_attention_decode"])
def test_attention_fp16_storage(ocl: Any, ref: Reference, op: str) -> None:
    case = Attn([(33, 1), (5, 1)], 16, 6, 2, 80) if op.endswith("decode") else PREFILL_CASES[6]
    _run_attention(ocl, ref, op, case, "causal", F16)


def test_metadata_updated_in_place_is_uploaded_again(ocl: Any, ref: Reference) -> None:
    # A runner may keep one metadata object for every decode step and rewrite its arrays
    # (captured decode batches): the device copies cached in it must follow.
    case = Attn([(20, 1), (3, 1)], 8, 4, 2, 64, strided=False, pad=0)
    inputs = _attention_inputs(ocl, case, F32, _seeded("in-place"))
    meta = inputs["meta"]
    kv = torch.randn((2, 2 * 128), generator=_seeded("in-place-kv"))  # (B, [k | v])
    for _ in range(3):
        key, value = ocl.split(ocl.from_host(kv), [128, 128])
        q, kc, vc = inputs["ocl"]
        q64, kc64, vc64 = inputs["ref"]
        ocl.reshape_and_cache(key, value, kc, vc, meta)
        key64, value64 = torch.split(kv.double(), [128, 128], -1)
        ref.reshape_and_cache(key64, value64, kc64, vc64, meta)
        got = ocl.to_host(ocl.paged_attention_decode(q, kc, vc, meta, 0.125))
        assert_close(
            got, ref.paged_attention_decode(q64, kc64, vc64, meta, 0.125), "attention", F32
        )
        assert_close(ocl.to_host(kc), kc64, "exact", F32)
        # next step: each sequence one token longer, written at its next slot
        meta.seq_lens += 1
        for b in range(2):
            p = int(meta.seq_lens[b]) - 1
            meta.slot_mapping[b] = meta.block_tables[b, p // 8] * 8 + p % 8


def test_captured_decode_step_replays_with_new_inputs(ocl: Any, ref: Reference) -> None:
    """capture_graph records a decode step; replays read the inputs' and the metadata's new
    values (rewritten in place, as the engine's runner does) and rewrite the same output."""
    case = Attn([(17, 1), (3, 1)], 8, 4, 2, 64, strided=False, pad=0)  # room for 4 steps
    inputs = _attention_inputs(ocl, case, F32, _seeded("capture"))
    meta = inputs["meta"]
    _, kc, vc = inputs["ocl"]
    _, kc64, vc64 = inputs["ref"]
    w64 = torch.randn((48, 4 * 64), generator=_seeded("capture-w"), dtype=F64) / 16
    weight = ocl.prepare_linear(ocl.from_host(w64, DType.FP32))
    q_in, kv_in = ocl.empty((2, 4 * 64), DType.FP32), ocl.empty((2, 2 * 128), DType.FP32)
    result: list[Any] = []

    def step() -> None:
        key, value = ocl.split(kv_in, [128, 128])
        ocl.reshape_and_cache(key, value, kc, vc, meta)
        result.append(ocl.linear(ocl.paged_attention_decode(q_in, kc, vc, meta, 0.125), weight))

    gen = _seeded("capture-inputs")
    for i in range(4):
        q, kv = torch.randn((2, 4 * 64), generator=gen), torch.randn((2, 256), generator=gen)
        ocl.copy_(q_in, ocl.from_host(q))
        ocl.copy_(kv_in, ocl.from_host(kv))
        if i == 0:
            graph = ocl.capture_graph(step)
            assert graph is not None
        else:
            graph.replay()
        key64, value64 = torch.split(kv.double(), [128, 128], -1)
        ref.reshape_and_cache(key64, value64, kc64, vc64, meta)
        attn = ref.paged_attention_decode(q.double(), kc64, vc64, meta, 0.125)
        want = ref.linear(attn, ref.prepare_linear(w64.float().double()))
        assert_close(ocl.to_host(result[0]), want, "attention", F32)
        meta.seq_lens += 1  # the next step: one token more per sequence, at its next slot
        for b in range(2):
            p = int(meta.seq_lens[b]) - 1
            meta.slot_mapping[b] = meta.block_tables[b, p // 8] * 8 + p % 8
    assert len(result) == 1  # the Python of step() ran once


def test_capture_refuses_host_round_trips(ocl: Any) -> None:
    x = ocl.from_host(torch.ones(3, 8))
    assert ocl.capture_graph(lambda: ocl.to_host(ocl.add(x, x))) is None
    assert ocl.capture_graph(lambda: ocl.add(x, x)) is not None


def test_decode_refuses_multi_token(ocl: Any) -> None:
    inputs = _attention_inputs(ocl, Attn([(3, 2)], 4, 2, 2, 8), F32, _seeded("refuse"))
    with pytest.raises(ValueError, match="one new token"):
        ocl.paged_attention_decode(*inputs["ocl"], inputs["meta"], 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("case", "padding"),
    [(Attn([(0, 1)], 16, 4, 4, 64), 0), (Attn([(3, 13), (0, 16)], 16, 2, 2, 80), 3),
     (Attn([(30, 2)] * 3, 8, 3, 3, 96), 1)],
    ids=["1tok", "block-edges", "padded"],
)  # fmt: skip
def test_reshape_and_cache(
    ocl: Any, ref: Reference, dtype: torch.dtype, case: Attn, padding: int
) -> None:
    gen = _seeded("cache", str(case), padding)
    meta, num_blocks = case.metadata(gen)
    slots = list(meta.slot_mapping)
    for i in range(padding):  # padding tokens (slot -1) must not be written
        slots.insert(2 * i, -1)
    meta = AttentionMetadata(
        np.array([0, len(slots)]), np.array([len(slots)]), meta.block_tables[:1],
        np.array(slots), case.block_size,
    )  # fmt: skip
    width = case.hkv * case.d
    kv, kv64 = _rand(gen, (len(slots), 2 * width), dtype)
    key, value = ocl.split(ocl.from_host(kv), [width, width])
    key64, value64 = torch.split(kv64, [width, width], -1)
    kc, kc64 = _rand(gen, (num_blocks, case.block_size, case.hkv, case.d), dtype)
    vc, vc64 = _rand(gen, (num_blocks, case.block_size, case.hkv, case.d), dtype)
    d_kc, d_vc = ocl.from_host(kc), ocl.from_host(vc)
    ocl.reshape_and_cache(key, value, d_kc, d_vc, meta)
    ref.reshape_and_cache(key64, value64, kc64, vc64, meta)
    assert_close(ocl.to_host(d_kc), kc64, "exact", dtype)
    assert_close(ocl.to_host(d_vc), vc64, "exact", dtype)


# -------------------------------------------------------------------------------------------
# activations, elementwise, gather
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "width"), ACT_SHAPES)
@pytest.mark.parametrize(
    "op", ["silu_and_mul", "gelu_and_mul", "gelu_and_mul-tanh", "gelu", "gelu-tanh"]
)
def test_activations(
    ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, width: int, op: str
) -> None:
    gen = _seeded("act", tokens, width, op)
    x, x64 = _strided(ocl, gen, tokens, width, dtype)
    name, _, approx = op.partition("-")
    kwargs = {} if name == "silu_and_mul" else {"approximate": approx or "none"}
    got = ocl.to_host(getattr(ocl, name)(x, **kwargs))
    assert got.dtype == dtype
    assert_close(got, getattr(ref, name)(x64, **kwargs), "elementwise", dtype)
    _check_out(ocl, lambda out: getattr(ocl, name)(x, out=out, **kwargs), got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "width"), ACT_SHAPES)
def test_add(ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, width: int) -> None:
    gen = _seeded("add", tokens, width)
    a, a64 = _strided(ocl, gen, tokens, width, dtype)
    b, b64 = _rand(gen, (tokens, width), dtype)
    d_b = ocl.from_host(b)
    got = ocl.to_host(ocl.add(a, d_b))
    assert_close(got, ref.add(a64, b64), "elementwise", dtype)
    _check_out(ocl, lambda out: ocl.add(a, d_b, out=out), got)


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(F16, id="fp16")])
@pytest.mark.parametrize(("tokens", "width"), ACT_SHAPES)
@pytest.mark.parametrize("factor", SCALE_FACTORS)
def test_scale(
    ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, width: int, factor: float
) -> None:
    gen = _seeded("scale", tokens, width, factor)
    x, x64 = _strided(ocl, gen, tokens, width, dtype)
    got = ocl.to_host(ocl.scale(x, factor))
    assert got.dtype == dtype
    rounded = float(torch.tensor(factor).to(dtype))
    assert_close(got, ref.scale(x64, rounded), "elementwise", dtype)
    # The product of two values of x's dtype is exact in fp32: one rounding, bit for bit.
    assert torch.equal(got, x64.to(dtype) * torch.tensor(factor, dtype=dtype))
    _check_out(ocl, lambda out: ocl.scale(x, factor, out=out), got)


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(F16, id="fp16")])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 32), (5, 1000), (3, 40001)])
@pytest.mark.parametrize("spread", SOFT_CAP_SCALES)
def test_soft_cap(
    ocl: Any, ref: Reference, dtype: torch.dtype, rows: int, vocab: int, spread: float
) -> None:
    gen = _seeded("soft_cap", rows, vocab, spread)
    xh, _ = _rand(gen, (rows, vocab), dtype, spread)
    xh[0, :2] = torch.tensor([float("inf"), -float("inf")], dtype=dtype)
    x = ocl.from_host(xh)
    got = ocl.to_host(ocl.soft_cap(x, 30.0))
    assert got.dtype == dtype
    assert_close(got, ref.soft_cap(xh.double(), 30.0), "elementwise", dtype)
    assert got[0, :2].tolist() == [30.0, -30.0]
    _check_out(ocl, lambda out: ocl.soft_cap(x, 30.0, out=out), got)
    nan = ocl.from_host(torch.full((2, 9), float("nan"), dtype=dtype))
    assert torch.isnan(ocl.to_host(ocl.soft_cap(nan, 30.0))).all()
    for bad in (0.0, -30.0):
        with pytest.raises(ValueError, match="cap > 0"):
            ocl.soft_cap(x, bad)


def test_gemma_operators_are_captured_and_replayed(ocl: Any, ref: Reference) -> None:
    gen = _seeded("gemma-capture")
    x, _ = _rand(gen, (2, 64), F32)
    w, _ = _rand(gen, (64,), F32)
    logits, _ = _rand(gen, (2, 500), F32, 40.0)
    d_x, d_w, d_logits = ocl.from_host(x), ocl.from_host(w), ocl.from_host(logits)
    outputs: dict[str, Any] = {}

    def step() -> None:
        outputs["norm"], _ = ocl.gemma_rms_norm(ocl.scale(d_x, 8.0), d_w, 1e-6)
        outputs["capped"] = ocl.soft_cap(d_logits, 30.0)

    graph = ocl.capture_graph(step)
    assert graph is not None
    x, _ = _rand(gen, (2, 64), F32)
    logits, _ = _rand(gen, (2, 500), F32, 40.0)
    ocl.copy_(d_x, ocl.from_host(x))
    ocl.copy_(d_logits, ocl.from_host(logits))
    graph.replay()
    want = ref.gemma_rms_norm(ref.scale(x.double(), 8.0), w.double(), 1e-6)[0]
    assert_close(ocl.to_host(outputs["norm"]), want, "norm", F32)
    assert_close(ocl.to_host(outputs["capped"]), ref.soft_cap(logits.double(), 30.0),
                 "elementwise", F32)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden", "rows"), [(1, 8, 1), (17, 80, 3), (40, 576, 40)])
def test_gather_rows(
    ocl: Any, ref: Reference, dtype: torch.dtype, tokens: int, hidden: int, rows: int
) -> None:
    gen = _seeded("gather", tokens, hidden, rows)
    x, x64 = _rand(gen, (tokens, hidden), dtype)
    idx = torch.randint(0, tokens, (rows,), generator=gen)
    d_x, d_idx = ocl.from_host(x), ocl.from_host(idx)
    got = ocl.to_host(ocl.gather_rows(d_x, d_idx))
    assert_close(got, ref.gather_rows(x64, idx), "exact", dtype)
    _check_out(ocl, lambda out: ocl.gather_rows(d_x, d_idx, out=out), got)


# -------------------------------------------------------------------------------------------
# logits processing and sampling (logits are fp32 by contract)
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "vocab"), LOGIT_SHAPES)
def test_apply_penalties(ocl: Any, ref: Reference, rows: int, vocab: int) -> None:
    gen = _seeded("penalties", rows, vocab)
    logits, logits64 = _rand(gen, (rows, vocab), F32, 4.0)
    prompt = torch.randint(-1, vocab, (rows, 12), generator=gen).numpy()
    output = torch.randint(-1, vocab, (rows, 20), generator=gen).numpy()
    settings = torch.rand((3, rows), generator=gen).numpy()
    meta = PenaltyMetadata(prompt, output, settings[0], settings[1], 1 + settings[2])
    d_logits = ocl.from_host(logits)
    assert ocl.apply_penalties(d_logits, meta) is d_logits
    ref.apply_penalties(logits64, meta)
    assert_close(ocl.to_host(d_logits), logits64, "softmax", F32)


def test_apply_token_bans(ocl: Any, ref: Reference) -> None:
    logits, logits64 = _rand(_seeded("bans"), (4, 50), F32)
    banned = torch.tensor([[3, -1, -1], [-1, -1, -1], [0, 49, 7], [7, 7, -1]])
    d_logits = ocl.from_host(logits)
    assert ocl.apply_token_bans(d_logits, ocl.from_host(banned)) is d_logits
    ref.apply_token_bans(logits64, banned)
    got = ocl.to_host(d_logits)
    assert_close(got, logits64, "exact", F32)
    assert int(torch.isinf(got).sum()) == 5


@pytest.mark.parametrize(("rows", "vocab"), BITMASK_SHAPES)
def test_apply_token_bitmask(ocl: Any, ref: Reference, rows: int, vocab: int) -> None:
    gen = _seeded("bitmask", rows, vocab)
    logits = torch.randn((rows, vocab), generator=gen)
    logits[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    logits64 = logits.double()
    mask = _token_bitmask(gen, rows, vocab)
    d_logits = ocl.from_host(logits)
    assert ocl.apply_token_bitmask(d_logits, ocl.from_host(mask)) is d_logits
    ref.apply_token_bitmask(logits64, mask)
    assert_close(ocl.to_host(d_logits), logits64, "exact", F32)  # NaN/Inf parity included
    d_logits = ocl.from_host(logits)
    ocl.apply_token_bitmask(d_logits, ocl.from_host(mask.long()))  # converted to int32
    assert_close(ocl.to_host(d_logits), logits64, "exact", F32)
    with pytest.raises(ValueError, match="ceil"):
        ocl.apply_token_bitmask(d_logits, ocl.from_host(torch.cat([mask, mask])))


@pytest.mark.parametrize(("rows", "vocab"), [(1, 32), (12, 1000), (3, 49152)])
def test_sample(ocl: Any, ref: Reference, rows: int, vocab: int) -> None:
    gen = _seeded("sample", rows, vocab)
    logits, logits64 = _rand(gen, (rows, vocab), F32, 3.0)
    meta = _sampling_meta(rows, gen)
    d_logits = ocl.from_host(logits)
    tokens = ocl.to_host(ocl.sample(d_logits, meta))
    assert tokens.dtype == torch.int64 and tuple(tokens.shape) == (rows,)
    assert torch.equal(ocl.to_host(d_logits), logits)  # logits untouched
    assert torch.equal(tokens, ocl.to_host(ocl.sample(d_logits, meta)))  # seeded
    greedy = torch.from_numpy(meta.temperature == 0)
    assert torch.equal(tokens[greedy], logits64.argmax(-1)[greedy])
    probs = ref.filtered_probs(logits64, meta)
    assert bool(torch.all(probs.gather(1, tokens.unsqueeze(1)) > 0))
    # A row's draw depends on its own seed and logits only, not on the rest of the batch.
    last = _rows(meta, slice(-1, None))
    alone = ocl.to_host(ocl.sample(ocl.from_host(logits[-1:]), last))
    assert int(alone[0]) == int(tokens[-1])


def _rows(meta: SamplingMetadata, rows: slice) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=meta.temperature[rows],
        top_k=meta.top_k[rows],
        top_p=meta.top_p[rows],
        min_p=meta.min_p[rows],
        seeds=meta.seeds[rows],
    )


def test_sample_greedy_ties_take_the_lowest_id(ocl: Any) -> None:
    logits = torch.zeros((2, 300))
    logits[0, [7, 200]] = 5.0
    logits[1, [299, 3]] = 1.0
    meta = SamplingMetadata(np.zeros(2), np.zeros(2), np.ones(2), np.zeros(2), np.arange(2))
    assert ocl.to_host(ocl.sample(ocl.from_host(logits), meta)).tolist() == [7, 3]


# (temperature, top_k, top_p, min_p): each filter alone, and all together.
DISTRIBUTIONS = [(0.8, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 0, 0.7, 0.0), (1.0, 0, 1.0, 0.15),
                 (0.9, 8, 0.9, 0.05)]  # fmt: skip


@pytest.mark.parametrize("setting", DISTRIBUTIONS, ids=lambda s: "t{}-k{}-p{}-m{}".format(*s))
def test_sampler_distribution(ocl: Any, ref: Reference, setting: tuple[float, ...]) -> None:
    """Many seeded draws of one row: the empirical distribution is the reference's filtered one
    (total variation and a chi-square test), and seeds spread the draws over its support."""
    draws, vocab = 40_000, 24
    logits = torch.randn((1, vocab), generator=_seeded("dist", setting), dtype=F64) * 1.5
    logits[0, 5] = logits[0, 6]  # a tie, kept or cut together by the filters
    temperature, top_k, top_p, min_p = setting
    meta = SamplingMetadata(
        np.full(draws, temperature), np.full(draws, top_k), np.full(draws, top_p),
        np.full(draws, min_p), np.random.default_rng(0).integers(0, 2**62, draws),
    )  # fmt: skip
    rows = logits.float().expand(draws, vocab).contiguous()
    tokens = ocl.to_host(ocl.sample(ocl.from_host(rows), meta))
    counts = torch.bincount(tokens, minlength=vocab).double()
    first = _rows(meta, slice(0, 1))
    p = ref.filtered_probs(logits.float().double(), first)[0]
    assert bool(torch.all(counts[p == 0] == 0)), "a filtered-out token was drawn"
    tv = 0.5 * float((counts / draws - p).abs().sum())
    assert tv < 0.015, f"total variation {tv:.4f}"
    kept = p > 0
    chi2 = float(((counts[kept] - draws * p[kept]) ** 2 / (draws * p[kept])).sum())
    dof = int(kept.sum()) - 1
    # chi-square with dof degrees of freedom exceeds dof + 6 sqrt(2 dof) + 10 with p < 1e-5
    assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1)) + 10, f"chi2 {chi2:.1f} with {dof} dof"


@pytest.mark.parametrize(("rows", "vocab"), [*LOGIT_SHAPES, (2, 49152)])
@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_compute_logprobs(ocl: Any, ref: Reference, rows: int, vocab: int, num_top: int) -> None:
    gen = _seeded("logprobs", rows, vocab, num_top)
    logits, logits64 = _rand(gen, (rows, vocab), F32, 3.0)
    ids = torch.randint(0, vocab, (rows,), generator=gen)
    got = ocl.compute_logprobs(ocl.from_host(logits), ocl.from_host(ids), num_top)
    want = ref.compute_logprobs(logits64, ids, num_top)
    assert_close(ocl.to_host(got.token_logprobs), want.token_logprobs, "softmax", F32)
    assert_close(ocl.to_host(got.token_ranks), want.token_ranks, "exact", F32)
    assert_close(ocl.to_host(got.top_ids), want.top_ids, "exact", F32)
    assert_close(ocl.to_host(got.top_logprobs), want.top_logprobs, "softmax", F32)


def test_logprobs_ties_list_the_lower_id_first(ocl: Any) -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0]])
    got = ocl.compute_logprobs(ocl.from_host(logits), ocl.from_host(torch.tensor([4])), 4)
    assert ocl.to_host(got.top_ids).tolist() == [[1, 3, 2, 4]]
    assert ocl.to_host(got.token_ranks).tolist() == [3]
