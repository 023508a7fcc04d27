"""Per-operator fallback: off by default and loud when on.

``PartialBackend`` is a backend in its own right (its own memory, most operators) that lacks a
few operators. Without fallback those raise ``UnsupportedOpError``; wrapped in
``FallbackBackend`` they run on the reference, give its results, write in-place results into
the caller's tensors, and every call is counted and the first one of each operator logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from llm_hal import (
    OPS,
    AttentionMetadata,
    Backend,
    DType,
    FallbackBackend,
    LinearWeight,
    LogprobsResult,
    MemoryInfo,
    PenaltyMetadata,
    QuantScheme,
    TorchBackend,
    UnsupportedOpError,
)
from llm_hal.spec import DeviceInfo

MISSING = frozenset({"gelu", "rotary_embedding", "linear", "compute_logprobs", "reshape_and_cache"})


class PartialBackend(Backend):
    """Implements the device methods and every operator but ``MISSING`` through a private
    TorchBackend, the way a vendor backend that is not built on torch would."""

    name: ClassVar[str] = "partial"
    float_dtypes: ClassVar[frozenset[DType]] = frozenset({DType.FP32, DType.FP64})

    def __init__(self) -> None:
        self.inner = TorchBackend("cpu")
        self.calls: list[str] = []

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(0, "partial device", 1 << 30)

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total=1 << 30, free=1 << 29)

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def empty(self, shape: Sequence[int], dtype: DType) -> Any:
        return self.inner.empty(shape, dtype)

    def from_host(self, data: Any, dtype: DType | None = None) -> Any:
        return self.inner.from_host(data, dtype)

    def to_host(self, tensor: Any) -> Any:
        return self.inner.to_host(tensor)

    def copy_(self, dst: Any, src: Any) -> Any:
        return self.inner.copy_(dst, src)

    def dtype_of(self, tensor: Any) -> DType:
        return self.inner.dtype_of(tensor)

    def reshape(self, tensor: Any, shape: Sequence[int]) -> Any:
        return self.inner.reshape(tensor, shape)

    def split(self, tensor: Any, sizes: Sequence[int]) -> list[Any]:
        return self.inner.split(tensor, sizes)

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: DType
    ) -> tuple[Any, Any]:
        return self.inner.allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_size, dtype)


def _delegating(op: str) -> Callable[..., Any]:
    def call(self: PartialBackend, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(op)
        return getattr(self.inner, op)(*args, **kwargs)

    call.__name__ = op
    return call


for _op in set(OPS) - MISSING:
    setattr(PartialBackend, _op, _delegating(_op))


@pytest.fixture
def primary() -> PartialBackend:
    return PartialBackend()


@pytest.fixture
def wrapped(primary: PartialBackend) -> FallbackBackend:
    return FallbackBackend(primary, TorchBackend("cpu"))


@pytest.fixture(scope="module")
def ref() -> TorchBackend:
    return TorchBackend("cpu")


def test_missing_op_is_refused_without_fallback(primary: PartialBackend) -> None:
    assert not primary.supports("gelu") and primary.supports("silu_and_mul")
    with pytest.raises(UnsupportedOpError) as err:
        primary.gelu(torch.randn(2, 4))
    message = str(err.value)
    assert "backend partial does not support operator gelu" in message
    assert "LLM_CORE_FALLBACK" in message  # says what to do
    assert err.value.op == "gelu" and err.value.backend == "partial"


def test_routing_covers_exactly_the_missing_ops(wrapped: FallbackBackend) -> None:
    assert wrapped.routed == MISSING
    assert all(wrapped.supports(op) for op in OPS)
    assert wrapped.name == "partial"
    assert wrapped.float_dtypes == PartialBackend.float_dtypes
    assert wrapped.supports("gelu", DType.BF16)  # the reference computes in bf16
    assert not wrapped.supports("silu_and_mul", DType.BF16)  # the primary does not


def test_device_and_memory_stay_with_the_primary(
    wrapped: FallbackBackend, primary: PartialBackend
) -> None:
    assert wrapped.device_info().name == "partial device"
    assert wrapped.memory_info() == MemoryInfo(total=1 << 30, free=1 << 29)
    wrapped.synchronize()
    assert primary.calls == ["synchronize"]
    k, _ = wrapped.allocate_kv_cache(2, 4, 1, 8, DType.FP32)
    assert tuple(k.shape) == (2, 4, 1, 8) and not k.any()
    assert wrapped.dtype_of(wrapped.from_host(np.zeros(3, np.float32))) is DType.FP32


def test_fallen_back_op_gives_reference_result_and_is_counted(
    wrapped: FallbackBackend, ref: TorchBackend, caplog: pytest.LogCaptureFixture
) -> None:
    x = torch.randn(3, 16)
    with caplog.at_level(logging.WARNING, logger="llm_hal.fallback"):
        first = wrapped.gelu(x, approximate="tanh")
        wrapped.gelu(x)
    assert torch.equal(first, ref.gelu(x, approximate="tanh"))
    assert wrapped.counts == {"gelu": 2}
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "operator gelu is not supported by backend partial; running it on reference (fallback)"
    ]


def test_supported_ops_run_on_the_primary(
    wrapped: FallbackBackend, primary: PartialBackend, ref: TorchBackend
) -> None:
    x = torch.randn(2, 8)
    assert torch.equal(wrapped.silu_and_mul(x), ref.silu_and_mul(x))
    assert primary.calls == ["silu_and_mul"]
    assert not wrapped.counts


def test_in_place_rotary_writes_the_callers_views(
    wrapped: FallbackBackend, ref: TorchBackend
) -> None:
    qkv = torch.randn(4, 3 * 16)
    q, k, _ = torch.split(qkv, [16, 16, 16], dim=-1)  # strided views of one tensor
    want = qkv.clone()
    ref.rotary_embedding(torch.arange(4), *torch.split(want, [16, 16, 16], dim=-1)[:2],
                         _cache(), 8, True)  # fmt: skip
    assert not torch.equal(want, qkv)

    rq, rk = wrapped.rotary_embedding(torch.arange(4), q, k, _cache(), 8, True)

    assert rq is q and rk is k
    assert torch.equal(qkv, want)
    assert wrapped.counts == {"rotary_embedding": 1}


def _cache() -> torch.Tensor:
    angles = torch.outer(torch.arange(8.0), torch.tensor([1.0, 0.1]))
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (8, 4): rotary_dim 4 of 8


def test_in_place_cache_write_lands_in_the_callers_cache(
    wrapped: FallbackBackend, ref: TorchBackend
) -> None:
    key_cache, value_cache = wrapped.allocate_kv_cache(3, 2, 1, 4, DType.FP32)
    key, value = torch.randn(3, 4), torch.randn(3, 4)
    meta = AttentionMetadata(np.array([0, 3]), np.array([3]), np.array([[2, 0]]),
                             np.array([4, -1, 1]), 2)  # fmt: skip
    assert wrapped.reshape_and_cache(key, value, key_cache, value_cache, meta) is None
    want_k, want_v = ref.allocate_kv_cache(3, 2, 1, 4, DType.FP32)
    ref.reshape_and_cache(key, value, want_k, want_v, meta)
    assert torch.equal(key_cache, want_k) and torch.equal(value_cache, want_v)
    assert key_cache.abs().sum() > 0


def test_quantized_linear_falls_back(wrapped: FallbackBackend, ref: TorchBackend) -> None:
    weight = torch.randint(-127, 128, (6, 32), dtype=torch.int8)
    scales = torch.rand(6, 4) * 0.01
    bias = torch.randn(6)
    prepared = wrapped.prepare_linear(weight, bias, QuantScheme.W8A16, scales, group_size=8)
    assert isinstance(prepared, LinearWeight)
    assert (prepared.out_features, prepared.in_features) == (6, 32)
    x = torch.randn(3, 32)
    out = torch.empty(3, 6)
    got = wrapped.linear(x, prepared, out=out)
    want = ref.linear(x, ref.prepare_linear(weight, bias, QuantScheme.W8A16, scales, group_size=8))
    assert torch.equal(got, want)
    assert wrapped.counts == {"linear": 1}


def test_logprobs_result_comes_back_whole(wrapped: FallbackBackend, ref: TorchBackend) -> None:
    logits = torch.randn(2, 20)
    ids = torch.tensor([3, 7])
    got = wrapped.compute_logprobs(logits, ids, num_top=4)
    want = ref.compute_logprobs(logits, ids, num_top=4)
    assert isinstance(got, LogprobsResult)
    for field in ("token_logprobs", "token_ranks", "top_logprobs", "top_ids"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_penalties_on_the_primary_stay_in_place(
    wrapped: FallbackBackend, primary: PartialBackend
) -> None:
    # apply_penalties is supported by the primary: no copy, no count.
    logits = torch.randn(1, 5)
    meta = PenaltyMetadata([[1]], [[2]], [0.5], [0.0], [1.0])
    assert wrapped.apply_penalties(logits, meta) is logits
    assert "apply_penalties" in primary.calls and not wrapped.counts
