"""Every torch-npu call of the Ascend backend, checked against torch-npu's own schemas.

The torch-npu wheel is downloaded (never installed) and its operator schemas and shape
functions are registered under ``torch.ops.npu`` (``support.ascend_schemas``). The backend's
operators then run under ``FakeTensorMode``: a call whose argument names, types or count differ
from torch-npu's signature fails in the dispatcher, and one whose shapes torch-npu's own meta
functions reject fails there. A recording dispatch mode lists which npu operators ran, so a
case that silently took the unfused path is caught too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from llm_core_ascend.backend import AscendBackend
from llm_core_ascend.ops import TORCH_NPU_VERSION
from llm_hal import AttentionMetadata, QuantScheme
from support import ascend_emulation as emulation
from support import ascend_schemas as schemas
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(scope="module")
def npu() -> Any:
    """torch.ops.npu with the wheel's schemas (and the emulation's CPU kernels)."""
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


class NpuCalls(TorchDispatchMode):
    """Records the npu operators dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace == "npu":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))


def run_fake(fn: Callable[[], Any]) -> tuple[list[str], Any]:
    with FakeTensorMode(allow_non_fake_inputs=True), NpuCalls() as calls:
        result = fn()
    return calls.names, result


# -------------------------------------------------------------------------------------------
# the wheel and the check itself
# -------------------------------------------------------------------------------------------


def test_the_wheel_is_the_pinned_release(npu: Any) -> None:
    ops = schemas.read_wheel(schemas.find_wheel())
    assert ops.version == TORCH_NPU_VERSION
    for name in schemas.BACKEND_OPS:
        assert name in ops.schemas, name
        assert name in ops.meta or name in schemas.DOC_SHAPE_FUNCTIONS, name
    # The wheel's own shape functions cover all but the two written from the docs.
    assert {n for n in schemas.BACKEND_OPS if n not in ops.meta} == set(schemas.DOC_SHAPE_FUNCTIONS)


def test_documented_signatures_hold(npu: Any) -> None:
    add_rms_norm = npu.npu_add_rms_norm.default._schema
    assert [a.name for a in add_rms_norm.arguments] == ["x1", "x2", "gamma", "epsilon"]
    assert len(add_rms_norm.returns) == 3  # (y, rstd, x1 + x2)
    fia = {a.name: a for a in npu.npu_fused_infer_attention_score.default._schema.arguments}
    assert str(fia["actual_seq_lengths"].type) == "Optional[List[int]]"  # host ints, SymInt[]?
    assert fia["block_table"].kwarg_only and fia["input_layout"].default_value == "BSH"
    scatter = npu.npu_scatter_pa_kv_cache.default._schema
    assert scatter.arguments[-1].name == "cache_mode"
    assert scatter.arguments[-1].default_value == "PA_NZ"  # the backend must say "Norm"


def test_a_wrong_call_is_refused(npu: Any) -> None:
    with FakeTensorMode():
        x = torch.empty(4, 16, dtype=torch.bfloat16)
        g = torch.empty(16, dtype=torch.bfloat16)
        npu.npu_rms_norm(x, g, epsilon=1e-6)
        with pytest.raises(RuntimeError, match="Unknown keyword argument 'eps'"):
            npu.npu_rms_norm(x, g, eps=1e-6)
        with pytest.raises(RuntimeError):
            npu.npu_swiglu(x, "last")  # int dim
        q = torch.empty(4, 2, 16, dtype=torch.bfloat16)
        kv = torch.empty(1, 128, 32, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="Unknown keyword argument 'num_kv_heads'"):
            npu.npu_fused_infer_attention_score(q, kv, kv, num_kv_heads=1)


def test_the_wheels_shape_checks_run(npu: Any) -> None:
    """torch-npu's meta functions check shapes, not only the schema."""
    with FakeTensorMode():
        q = torch.empty(4, 2, 16, dtype=torch.bfloat16)
        kv = torch.empty(1, 128, 32, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="numHeads"):
            npu.npu_fused_infer_attention_score(q, kv, kv, num_heads=0, input_layout="TND")


# -------------------------------------------------------------------------------------------
# every operator of the backend, under FakeTensorMode
# -------------------------------------------------------------------------------------------

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _metadata(query_lens: list[int], seq_lens: list[int], block_size: int) -> AttentionMetadata:
    """Sequences laid out in consecutive blocks; one padding token (slot -1) at the end."""
    blocks_each = -(-max(seq_lens) // block_size)
    tables = np.arange(len(seq_lens) * blocks_each).reshape(len(seq_lens), blocks_each)
    slots = [
        int(tables[b, p // block_size]) * block_size + p % block_size
        for b, (q, s) in enumerate(zip(query_lens, seq_lens))
        for p in range(s - q, s)
    ]
    starts = np.concatenate([[0], np.cumsum(query_lens)])
    starts[-1] += 1  # the padding token belongs to the last sequence's rows
    seq = np.array(seq_lens)
    seq[-1] += 1
    return AttentionMetadata(starts, seq, tables, np.array([*slots, -1]), block_size)


def _rotary(backend: AscendBackend, dtype: torch.dtype, d: int, rot: int, neox: bool) -> Any:
    t, hq, hkv = 5, 4, 2
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, _ = backend.split(qkv, [hq * d, hkv * d, hkv * d])
    cache = torch.randn(64, rot, dtype=FP32)
    return backend.rotary_embedding(torch.arange(t), q, k, cache, d, neox)


def _prefill(backend: AscendBackend, dtype: torch.dtype, block_size: int, **kw: Any) -> Any:
    hq, hkv, d = 8, 2, 64
    meta = _metadata([3, 6], [3, 140], block_size)
    kc, vc = (torch.zeros(8, block_size, hkv, d, dtype=dtype) for _ in range(2))
    q = torch.randn(meta.num_tokens, hq * d, dtype=dtype)
    return backend.paged_attention_prefill(q, kc, vc, meta, d**-0.5, **kw)


def _decode(backend: AscendBackend, dtype: torch.dtype, block_size: int, **kw: Any) -> Any:
    hq, hkv, d = 8, 2, 64
    per_seq = -(-300 // block_size)
    tables = np.arange(3 * per_seq).reshape(3, per_seq)
    meta = AttentionMetadata(np.arange(4), np.array([1, 17, 300]), tables, np.arange(3), block_size)
    kc, vc = (torch.zeros(3 * per_seq, block_size, hkv, d, dtype=dtype) for _ in range(2))
    q = torch.randn(3, hq * d, dtype=dtype)
    return backend.paged_attention_decode(q, kc, vc, meta, d**-0.5, **kw)


def _cache_write(backend: AscendBackend, dtype: torch.dtype) -> Any:
    hkv, d = 2, 64
    meta = _metadata([2, 3], [2, 3], 128)
    kv = torch.randn(meta.num_tokens, 3 * hkv * d, dtype=dtype)
    _, k, v = backend.split(kv, [hkv * d, hkv * d, hkv * d])  # strided views, as the model's
    kc, vc = (torch.zeros(4, 128, hkv, d, dtype=dtype) for _ in range(2))
    backend.reshape_and_cache(k, v, kc, vc, meta)
    return kc


def _linear(backend: AscendBackend, dtype: torch.dtype, scheme: QuantScheme, group: int) -> Any:
    n, k = 96, 128
    groups = k // group if group else 1
    if scheme is QuantScheme.W4A16:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        zeros = torch.randint(0, 16, (n, groups)).float()
    elif scheme is QuantScheme.NONE:
        w, zeros = torch.randn(n, k, dtype=dtype), None
    else:
        w, zeros = torch.randint(-127, 128, (n, k), dtype=torch.int8), None
    scales = None if scheme is QuantScheme.NONE else torch.rand(n, groups)
    lw = backend.prepare_linear(w, torch.randn(n, dtype=dtype), scheme, scales, zeros, group)
    return backend.linear(torch.randn(7, k, dtype=dtype), lw)


def _rms(backend: AscendBackend, dtype: torch.dtype, residual: bool) -> Any:
    x = torch.randn(5, 64, dtype=dtype)
    r = torch.randn(5, 64, dtype=dtype) if residual else None
    y, s = backend.rms_norm(x, torch.randn(64, dtype=dtype), 1e-6, r)
    return y if s is None else torch.cat((y, s))


# (id, the call, the npu operators it must dispatch, the result's shape)
CASES: list[tuple[str, Callable[[AscendBackend], Any], list[str], tuple[int, ...]]] = [
    ("rms_norm", lambda b: _rms(b, BF16, False), ["npu_rms_norm"], (5, 64)),
    ("rms_norm_fp32", lambda b: _rms(b, FP32, False), ["npu_rms_norm"], (5, 64)),
    ("add_rms_norm", lambda b: _rms(b, FP16, True), ["npu_add_rms_norm"], (10, 64)),
    (
        "silu_and_mul",
        lambda b: b.silu_and_mul(torch.randn(5, 96, dtype=BF16)),
        ["npu_swiglu"],
        (5, 48),
    ),
    (
        "rope_fused",
        lambda b: _rotary(b, BF16, 64, 64, True)[0],
        ["npu_apply_rotary_pos_emb"],
        (5, 256),
    ),
    (
        "rope_fused_128",
        lambda b: _rotary(b, FP16, 128, 128, True)[1],
        ["npu_apply_rotary_pos_emb"],
        (5, 256),
    ),
    ("rope_partial", lambda b: _rotary(b, BF16, 64, 32, True)[0], ["npu_rotary_mul"] * 2, (5, 256)),
    ("rope_gptj", lambda b: _rotary(b, BF16, 64, 64, False)[1], ["npu_rotary_mul"] * 2, (5, 128)),
    ("rope_head_96", lambda b: _rotary(b, FP32, 96, 96, True)[0], ["npu_rotary_mul"] * 2, (5, 384)),
    (
        "reshape_and_cache",
        lambda b: _cache_write(b, BF16),
        ["npu_scatter_pa_kv_cache"],
        (4, 128, 2, 64),
    ),
    ("prefill", lambda b: _prefill(b, BF16, 128), ["npu_fused_infer_attention_score"], (10, 512)),
    (
        "prefill_window",
        lambda b: _prefill(b, FP16, 256, sliding_window=4),
        ["npu_fused_infer_attention_score"],
        (10, 512),
    ),
    ("decode", lambda b: _decode(b, BF16, 16), ["npu_fused_infer_attention_score"], (3, 512)),
    (
        "decode_window",
        lambda b: _decode(b, FP16, 128, sliding_window=32),
        ["npu_fused_infer_attention_score"],
        (3, 512),
    ),
    (
        "w8a16",
        lambda b: _linear(b, BF16, QuantScheme.W8A16, 0),
        ["npu_weight_quant_batchmatmul"],
        (7, 96),
    ),
    (
        "w8a16_group",
        lambda b: _linear(b, FP16, QuantScheme.W8A16, 32),
        ["npu_weight_quant_batchmatmul"],
        (7, 96),
    ),
    (
        "w4a16",
        lambda b: _linear(b, BF16, QuantScheme.W4A16, 64),
        ["npu_convert_weight_to_int4pack", "npu_weight_quant_batchmatmul"],
        (7, 96),
    ),
    (
        "w8a8",
        lambda b: _linear(b, BF16, QuantScheme.W8A8, 0),
        ["npu_dynamic_quant", "npu_quant_matmul"],
        (7, 96),
    ),
    (
        "dense_nz",
        lambda b: _linear(
            AscendBackend("cpu", ops=b.npu, nz_weights=True), BF16, QuantScheme.NONE, 0
        ),
        ["npu_format_cast"],
        (7, 96),
    ),
]


@pytest.mark.parametrize(
    ("case", "ops", "shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_backend_calls_match_torch_npu(
    backend: AscendBackend,
    case: Callable[[AscendBackend], Any],
    ops: list[str],
    shape: tuple[int, ...],
) -> None:
    called, result = run_fake(lambda: case(backend))
    assert called == ops
    assert tuple(result.shape) == shape


UNFUSED: list[tuple[str, Callable[[AscendBackend], Any], str]] = [
    ("prefill_fp32", lambda b: _prefill(b, FP32, 128), "fp16/bf16 only"),
    ("prefill_block_16", lambda b: _prefill(b, BF16, 16), "block_size 16"),
    ("decode_block_8", lambda b: _decode(b, BF16, 8), "block_size 8"),
    ("decode_soft_cap", lambda b: _decode(b, BF16, 16, logits_soft_cap=30.0), "soft-capping"),
    ("w8a8_fp32", lambda b: _linear(b, FP32, QuantScheme.W8A8, 0), "float32 activations"),
    ("w8a16_group_16", lambda b: _linear(b, BF16, QuantScheme.W8A16, 16), "group 16"),
]


@pytest.mark.parametrize(("case", "why"), [c[1:] for c in UNFUSED], ids=[c[0] for c in UNFUSED])
def test_cases_the_kernels_refuse_run_unfused_and_say_so(
    backend: AscendBackend,
    case: Callable[[AscendBackend], Any],
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="llm_core_ascend.backend"):
        called, _ = run_fake(lambda: case(backend))
    assert called == []
    assert any(why in r.getMessage() for r in caplog.records), caplog.text
