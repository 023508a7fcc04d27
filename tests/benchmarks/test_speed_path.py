"""Correctness of the CPU speed path (these run in the normal suite, not only with
``--benchmark-only``): a captured decode step replays exactly what eager execution computes,
a capture that meets an operator it cannot record is refused rather than replayed wrong, the
engine's greedy output is the same with and without captured decode steps, and the CPU
backend's torch operators (used when the C kernels are unavailable) stay right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest_loaders import save_tiny_hf_checkpoint
from llm_core import LLM, SamplingParams
from llm_core_cpu import CpuBackend
from llm_hal import AttentionMetadata, FallbackBackend, TorchBackend
from support.numerics import assert_close


@pytest.fixture(scope="module")
def cpu() -> CpuBackend:
    be = CpuBackend()
    if be.kernels.startswith("torch"):
        pytest.skip(f"no C kernels here: {be.kernels}")
    return be


def _decode_meta(lens: list[int], block: int = 4) -> AttentionMetadata:
    nb = max(-(-n // block) for n in lens)
    tables = np.arange(len(lens) * nb, dtype=np.int32).reshape(len(lens), nb)
    slots = [int(tables[b, (n - 1) // block]) * block + (n - 1) % block for b, n in enumerate(lens)]
    return AttentionMetadata(np.arange(len(lens) + 1), np.array(lens), tables, np.array(slots),
                             block)  # fmt: skip


def test_replay_recomputes_from_updated_inputs(cpu: CpuBackend) -> None:
    gen = torch.Generator().manual_seed(0)
    w = cpu.prepare_linear(torch.randn(24, 16, generator=gen))
    norm = torch.rand(16, generator=gen) + 0.5
    table = torch.randn(50, 16, generator=gen)
    ids = torch.tensor([3, 7], dtype=torch.int64)
    results: list[torch.Tensor] = []

    def step() -> None:
        h = cpu.embedding(ids, table)
        x, _ = cpu.rms_norm(h, norm, 1e-6)
        results.append(cpu.silu_and_mul(cpu.linear(x, w)))

    graph = cpu.capture_graph(step)
    assert graph is not None and len(results) == 1
    first = results[0].clone()
    ids.copy_(torch.tensor([11, 2]))  # the caller updates inputs in place, then replays
    graph.replay()
    x, _ = cpu.rms_norm(cpu.embedding(ids, table), norm, 1e-6)
    expected = cpu.silu_and_mul(cpu.linear(x, w))
    assert torch.equal(results[0], expected) and not torch.equal(results[0], first)


def test_replayed_attention_reads_the_updated_metadata(cpu: CpuBackend) -> None:
    gen = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(8, 4, 2, 8, generator=gen), torch.randn(8, 4, 2, 8, generator=gen)
    q = torch.randn(2, 4 * 8, generator=gen)
    meta = _decode_meta([5, 9])
    out: list[torch.Tensor] = []
    graph = cpu.capture_graph(lambda: out.append(cpu.paged_attention_decode(q, kc, vc, meta, 0.3)))
    assert graph is not None
    meta.seq_lens[:] = [7, 3]  # in place: same shapes, new values
    graph.replay()
    updated = AttentionMetadata(meta.query_start_loc, np.array([7, 3]), meta.block_tables,
                                meta.slot_mapping, meta.block_size)  # fmt: skip
    ref = TorchBackend("cpu").paged_attention_decode(q, kc, vc, updated, 0.3)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)


def test_capture_refuses_operators_it_cannot_replay(cpu: CpuBackend) -> None:
    x = torch.randn(2, 8)
    seen: list[torch.Tensor] = []
    assert cpu.capture_graph(lambda: seen.append(cpu.gelu(cpu.add(x, x)))) is None
    assert torch.equal(seen[0], cpu.gelu(cpu.add(x, x)))  # fn still ran, once, correctly
    # A reshape that must copy (not a view) would be skipped by replay: refused too.
    strided = torch.randn(3, 10)[:, :8]
    assert cpu.capture_graph(lambda: cpu.silu_and_mul(cpu.reshape(strided, (6, 4)))) is None

    # Operators routed to a fallback backend would be missing from the graph.
    class Partial(TorchBackend):
        name = "partial"

        def supports(self, op: str, dtype: object = None, **shape: int) -> bool:
            return op != "gelu" and super().supports(op, dtype, **shape)

    routed = FallbackBackend(Partial("cpu"), cpu)
    calls: list[int] = []
    assert routed.routed and routed.capture_graph(lambda: calls.append(1)) is None
    assert calls == [1]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_greedy_output_is_the_same_captured_or_eager(
    tmp_path_factory: pytest.TempPathFactory, arch: str, dtype: str
) -> None:
    path = tmp_path_factory.mktemp("graph") / arch
    save_tiny_hf_checkpoint(path, arch)
    prompts = [{"prompt_token_ids": list(range(5 + i, 8 + 5 * i))} for i in range(5)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outputs = {}
    for capture in (False, True):
        llm = LLM(str(path), dtype=dtype, kv_cache_memory="16MiB", load_progress=False)
        llm.llm_engine.runner.capture = capture
        outs = llm.generate(prompts, params, use_tqdm=False)
        outputs[capture] = [o.outputs[0].token_ids for o in outs]
        graphs = llm.llm_engine.runner._graphs
        if capture:
            assert graphs, "no decode step went through a captured graph"
            if arch == "llama":  # qwen3's per-head q/k norm copies a strided view: eager
                assert all(g.graph is not None for g in graphs.values())
    assert outputs[True] == outputs[False]


# -------------------------------------------------------------------------------------------
# the torch operators of the CPU backend (its path without the C kernels)
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_operators_match_the_reference(dtype: torch.dtype) -> None:
    be, ref = CpuBackend(use_kernels=False), TorchBackend("cpu")
    gen = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    x, w, r, norm = rand(5, 16), rand(24, 16), rand(5, 16), rand(16)
    lw, lref = be.prepare_linear(w), ref.prepare_linear(w.double())
    assert_close(be.linear(x, lw), ref.linear(x.double(), lref), "linear", dtype)
    y, s = be.rms_norm(x, norm, 1e-6, residual=r)
    y_ref, s_ref = ref.rms_norm(x.double(), norm.double(), 1e-6, residual=r.double())
    assert_close(y, y_ref, "norm", dtype)
    assert_close(s, s_ref, "elementwise", dtype)
    gu = rand(5, 32)
    assert_close(be.silu_and_mul(gu), ref.silu_and_mul(gu.double()), "elementwise", dtype)
    kc, vc, q = rand(8, 4, 2, 8), rand(8, 4, 2, 8), rand(2, 32)
    meta = _decode_meta([5, 9])
    got = be.paged_attention_decode(q, kc, vc, meta, 1 / math.sqrt(8))
    want = ref.paged_attention_decode(q.double(), kc.double(), vc.double(), meta, 1 / math.sqrt(8))
    assert_close(got, want, "attention", dtype)


def test_weights_on_the_huge_page_arena_keep_their_values(cpu: CpuBackend) -> None:
    w = torch.randn(300, 70).bfloat16()
    prepared = cpu.prepare_linear(w)
    assert torch.equal(prepared.weight, w) and prepared.weight.data_ptr() != w.data_ptr()
    x = torch.randn(1, 70).bfloat16()
    assert_close(cpu.linear(x, prepared), x.double() @ w.double().T, "linear", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("tokens", "k", "n"), [(33, 70, 37), (64, 576, 48), (97, 40, 130)])
def test_linear_kernel_paths_for_every_batch_size(
    cpu: CpuBackend, dtype: torch.dtype, tokens: int, k: int, n: int
) -> None:
    # Batch 1 streams rows, 2-32 tokens use register tiles, more a packed GEMM; the op tests
    # stop at 17 tokens. Odd N and K exercise the tails, a strided x the row stride.
    gen = torch.Generator().manual_seed(tokens)
    wide = torch.randn(tokens, k + 5, generator=gen).to(dtype)
    x = wide[:, :k]
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    prepared = cpu.prepare_linear(w, b)
    want = x.double() @ w.double().T + b.double()
    for t in sorted({1, 2, 3, 4, 5, 8, 31, 32, tokens}):
        got = cpu.linear(x[:t], prepared)
        assert_close(got, want[:t], "linear", dtype)
