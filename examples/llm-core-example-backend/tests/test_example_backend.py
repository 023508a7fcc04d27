"""The example backend's own tests: its operator against the reference, and discovery.

A vendor copies this file: every operator the backend replaces is compared with the reference
run in float64, on several shapes and every dtype the backend claims.
"""

from __future__ import annotations

import pytest
import torch
from llm_core_example.backend import ExampleBackend
from llm_hal import DType, Registry, TorchBackend

TOLERANCE = {
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (1e-3, 1e-3),
}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (7, 160), (33, 688)])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[0])
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    got = ExampleBackend().silu_and_mul(x)
    want = TorchBackend().silu_and_mul(x.double())  # the oracle, in float64
    assert got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def test_out_is_written() -> None:
    x = torch.randn(4, 32)
    out = torch.empty(4, 16)
    assert ExampleBackend().silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out, TorchBackend().silu_and_mul(x))


def test_found_through_the_entry_point() -> None:
    registry = Registry()
    record = registry.records["example"]
    assert record.loaded, record.error
    assert record.distribution == "llm-core-example-backend"
    backend = registry.create("example")
    assert isinstance(backend, ExampleBackend)
    assert backend.native_ops() == {"silu_and_mul"}
    assert backend.supports("silu_and_mul", DType.BF16)
    assert not backend.supports("silu_and_mul", DType.FP64)
