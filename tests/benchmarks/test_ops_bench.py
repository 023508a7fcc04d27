"""Microbenchmarks of the hot HAL operators at SmolLM2-135M's shapes, on every available
backend: linear (GEMV at batch 1, small batches, a prefill GEMM), paged attention (decode and
prefill), fused rms_norm; plus the machine probes (streaming read, GEMM) they are compared to.

``pytest tests/benchmarks --benchmark-only``; bytes and FLOPs of each case are in
``benchmark.extra_info`` and in the summary table printed at the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from llm_core.benchmarks import MachineCeilings
from llm_hal import AttentionMetadata, Backend, DType

#: SmolLM2-135M: hidden 576, MLP 1536 (gate+up fused: 3072), 9 query / 3 KV heads of 64.
HIDDEN, INTER, HQ, HKV, HEAD = 576, 1536, 9, 3, 64
DTYPES = [pytest.param(DType.BF16, id="bf16"), pytest.param(DType.FP32, id="fp32")]
LINEAR_CASES = [  # (tokens, in, out): the fused gate/up, the down projection, the LM head
    (1, HIDDEN, 2 * INTER),
    (1, INTER, HIDDEN),
    (1, HIDDEN, 49152),
    (8, HIDDEN, 2 * INTER),
    (32, HIDDEN, 2 * INTER),
    (512, HIDDEN, 2 * INTER),
]


def _upload(be: Backend, t: torch.Tensor, dtype: DType) -> object:
    return be.from_host(t, dtype)


def _run(be: Backend, fn: object) -> object:
    def call() -> object:
        result = fn()  # type: ignore[operator]
        be.synchronize()
        return result

    return call


def _skip_unsupported(be: Backend, op: str, dtype: DType) -> None:
    if not be.supports(op, dtype):
        pytest.skip(f"{be.name} does not support {op} in {dtype.value}")


# -------------------------------------------------------------------------------------------
# machine probes
# -------------------------------------------------------------------------------------------


def test_probe_read_bandwidth(benchmark: Any, record: Any, ceilings: MachineCeilings) -> None:
    a = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, far past the last-level cache
    benchmark(a.sum)
    record("probe: read (sum)", "256 MiB fp32", a.numel() * 4, a.numel())


def test_probe_gemm(benchmark: Any, record: Any, ceilings: MachineCeilings) -> None:
    n = 1024
    x, y = torch.randn(n, n), torch.randn(n, n)
    benchmark(torch.mm, x, y)
    record("probe: GEMM fp32", f"{n}^3", 3 * n * n * 4, 2 * n**3)


# -------------------------------------------------------------------------------------------
# operators
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "k", "n"), LINEAR_CASES, ids=lambda v: str(v))
def test_linear(
    benchmark: Any, record: Any, ceilings: MachineCeilings, backend: Backend, dtype: DType,
    tokens: int, k: int, n: int,
) -> None:  # fmt: skip
    _skip_unsupported(backend, "linear", dtype)
    gen = torch.Generator().manual_seed(0)
    w = backend.prepare_linear(_upload(backend, torch.randn(n, k, generator=gen) / k**0.5, dtype))
    x = _upload(backend, torch.randn(tokens, k, generator=gen), dtype)
    benchmark(_run(backend, lambda: backend.linear(x, w)))
    size = dtype.itemsize
    record("linear", f"{dtype.value} T={tokens} {k}->{n}", (n * k + tokens * (k + n)) * size,
           2.0 * tokens * n * k)  # fmt: skip


def _paged(
    be: Backend, dtype: DType, contexts: list[tuple[int, int]], block: int = 16
) -> tuple[object, object, object, AttentionMetadata]:
    """Caches holding every sequence's context, and the metadata for the new tokens."""
    need = [-(-(c + n) // block) for c, n in contexts]
    tables = np.zeros((len(contexts), max(need)), dtype=np.int32)
    slots, start = [], 0
    for b, ((cached, new), nb) in enumerate(zip(contexts, need)):
        tables[b, :nb] = np.arange(start, start + nb)
        start += nb
        slots += [int(tables[b, p // block]) * block + p % block
                  for p in range(cached, cached + new)]  # fmt: skip
    starts = np.concatenate([[0], np.cumsum([n for _, n in contexts])])
    meta = AttentionMetadata(starts, np.array([c + n for c, n in contexts]), tables,
                             np.array(slots), block)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = be.allocate_kv_cache(start, block, HKV, HEAD, dtype)
    kv = torch.randn(start, block, HKV, HEAD, generator=gen)
    be.copy_(k_cache, _upload(be, kv, dtype))
    be.copy_(v_cache, _upload(be, kv.flip(0), dtype))
    q = _upload(be, torch.randn(meta.num_tokens, HQ * HEAD, generator=gen), dtype)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "context"), [(1, 512), (8, 512), (32, 256)])
def test_paged_attention_decode(
    benchmark: Any, record: Any, ceilings: MachineCeilings, backend: Backend, dtype: DType,
    batch: int, context: int,
) -> None:  # fmt: skip
    _skip_unsupported(backend, "paged_attention_decode", dtype)
    q, kc, vc, meta = _paged(backend, dtype, [(context - 1, 1)] * batch)
    scale = 1 / math.sqrt(HEAD)
    benchmark(_run(backend, lambda: backend.paged_attention_decode(q, kc, vc, meta, scale)))
    kv_bytes = 2 * batch * context * HKV * HEAD * dtype.itemsize
    record("paged_attention_decode", f"{dtype.value} B={batch} ctx={context}",
           kv_bytes + 2 * batch * HQ * HEAD * dtype.itemsize,
           4.0 * batch * HQ * context * HEAD)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [128, 512])
def test_paged_attention_prefill(
    benchmark: Any, record: Any, ceilings: MachineCeilings, backend: Backend, dtype: DType,
    tokens: int,
) -> None:  # fmt: skip
    _skip_unsupported(backend, "paged_attention_prefill", dtype)
    q, kc, vc, meta = _paged(backend, dtype, [(0, tokens)])
    scale = 1 / math.sqrt(HEAD)
    benchmark(_run(backend, lambda: backend.paged_attention_prefill(q, kc, vc, meta, scale)))
    size = dtype.itemsize
    record("paged_attention_prefill", f"{dtype.value} T={tokens} causal",
           (2 * tokens * HKV + 2 * tokens * HQ) * HEAD * size,
           2.0 * HQ * tokens * tokens * HEAD)  # causal: half of 4 * T^2 * D per head  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 512])
def test_rms_norm_fused_residual(
    benchmark: Any, record: Any, ceilings: MachineCeilings, backend: Backend, dtype: DType,
    tokens: int,
) -> None:  # fmt: skip
    _skip_unsupported(backend, "rms_norm", dtype)
    gen = torch.Generator().manual_seed(2)
    x = _upload(backend, torch.randn(tokens, HIDDEN, generator=gen), dtype)
    r = _upload(backend, torch.randn(tokens, HIDDEN, generator=gen), dtype)
    w = _upload(backend, torch.rand(HIDDEN, generator=gen) + 0.5, dtype)
    benchmark(_run(backend, lambda: backend.rms_norm(x, w, 1e-5, residual=r)))
    record("rms_norm + residual", f"{dtype.value} T={tokens} H={HIDDEN}",
           (4 * tokens + 1) * HIDDEN * dtype.itemsize, 5.0 * tokens * HIDDEN)  # fmt: skip
