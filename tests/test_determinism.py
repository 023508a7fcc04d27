"""Seeded determinism: a seeded request gives the same tokens whatever else the engine runs.

The promise holds exactly where the backend is batch-invariant in the dtype
(``Backend.batch_invariant``): every operator computes a row from that row alone, so a request's
tokens cannot depend on how many other requests share its steps, what they hold, or how the
scheduler chunks its prompt. The CPU backend is batch-invariant in fp32 and bf16 with
``batch_invariant=1``; by default ("auto") in fp32, and in bf16 unless the CPU has a bf16 GEMM
that prefills faster (oneDNN on AVX512-BF16 / AMX). Here: the promise on a tiny checkpoint,
alone vs in batches of 8 and 32, and the audit that checks it in the conformance matrix.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from conftest_loaders import TINY_VOCAB, save_tiny_hf_checkpoint
from llm_conformance.audits import Auditor
from llm_conformance.models import tiny_model_under_test
from llm_core import LLM, SamplingParams
from llm_core_cpu import CpuBackend
from llm_core_cpu.backend import ENV_BATCH_INVARIANT
from llm_hal import BackendConfig, BackendLoadError, DType, LinearWeight, get_registry
from llm_hal.backend import Tensor

SEEDED = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True, logprobs=3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
BATCHES = (8, 32)
DTYPES = [pytest.param("float32", id="fp32"), pytest.param("bfloat16", id="bf16")]


def _prompts(n: int) -> list[list[int]]:
    """n prompts of 3 to 60 tokens (32 of them take several 64-token prefill chunks)."""
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randint(3, TINY_VOCAB, (3 + (17 * i) % 58,), generator=gen).tolist() for i in range(n)
    ]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("llama-determinism")
    save_tiny_hf_checkpoint(path, "llama")
    return path


def _engine(path: pathlib.Path, dtype: str, batch_invariant: str) -> LLM:
    return LLM(
        str(path),
        backend="cpu",
        dtype=dtype,
        backend_options={"batch_invariant": batch_invariant},
        kv_cache_memory="8MiB",
        max_num_batched_tokens=64,  # chunked prefill: a batch splits prompts differently
        load_progress=False,
    )


def _run(output: Any) -> tuple[list[int], list[dict[int, float]]]:
    completion = output.outputs[0]
    steps = completion.logprobs or []
    return completion.token_ids, [{t: lp.logprob for t, lp in s.items()} for s in steps]


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_seeded_request_is_the_same_alone_and_in_batches_of_8_and_32(
    llama: pathlib.Path, dtype: str
) -> None:
    llm = _engine(llama, dtype, "1")
    backend = llm.llm_engine.backend
    assert isinstance(backend, CpuBackend) and backend.batch_invariant(DType(dtype))
    prompts = _prompts(max(BATCHES))
    others = [
        SamplingParams(temperature=1.0, top_k=20, max_tokens=24, ignore_eos=True)  # unseeded
        if i % 3 == 0
        else (GREEDY if i % 3 == 1 else SamplingParams(temperature=0.7, seed=i, max_tokens=9))
        for i in range(max(BATCHES))
    ]
    target = prompts[5]
    for params in (SEEDED, GREEDY):
        alone = _run(llm.generate([target], params, use_tqdm=False)[0])
        for n in BATCHES:
            at = n // 2  # the request in the middle of the batch, prefilled with the others
            batch = [*prompts[:at], target, *prompts[at + 1 : n]]
            batch_params = [*others[:at], params, *others[at + 1 : n]]
            got = _run(llm.generate(batch, batch_params, use_tqdm=False)[at])
            assert got[0] == alone[0], f"{dtype}, batch of {n}: tokens differ"
            assert got[1] == alone[1], f"{dtype}, batch of {n}: log-probabilities differ"


def test_the_promise_per_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 always; bf16 unless the CPU has a faster bf16 GEMM ("auto"); all or nothing when
    set; nothing without the C kernels, nor in fp16 and fp64 (torch operators)."""
    monkeypatch.delenv(ENV_BATCH_INVARIANT, raising=False)
    auto = CpuBackend()
    assert auto.batch_invariant(DType.FP32)
    bf16_gemm = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert auto.batch_invariant(DType.BF16) == (not bf16_gemm)
    assert not auto.batch_invariant(DType.FP16) and not auto.batch_invariant(DType.FP64)
    on, off = CpuBackend(batch_invariant=True), CpuBackend(batch_invariant=False)
    assert on.batch_invariant(DType.BF16) and on.batch_invariant(DType.FP32)
    assert not off.batch_invariant(DType.BF16) and not off.batch_invariant(DType.FP32)
    assert not CpuBackend(use_kernels=False, batch_invariant=True).batch_invariant(DType.FP32)
    assert on.device_info().properties["batch_invariant"] == "float32, bfloat16"
    assert off.device_info().properties["batch_invariant"] == "no"
    monkeypatch.setenv(ENV_BATCH_INVARIANT, "0")
    assert not CpuBackend().batch_invariant(DType.FP32)
    registry = get_registry()
    made = registry.create("cpu", BackendConfig(options={"batch_invariant": "1"}))
    assert isinstance(made, CpuBackend) and made.batch_invariant(DType.BF16)
    with pytest.raises(BackendLoadError, match="unknown cpu backend option"):
        registry.create("cpu", BackendConfig(options={"batch_invariance": "1"}))


# -- the audit ---------------------------------------------------------------------------------


class _Pretender(CpuBackend):
    """Claims batch invariance, but its linear layers round differently in bigger batches."""

    def __init__(self) -> None:
        super().__init__(batch_invariant=True)

    def linear(self, x: torch.Tensor, weight: LinearWeight, out: Tensor | None = None) -> Tensor:
        y = super().linear(x, weight, out)
        if x.shape[0] > 8:
            y.mul_(1 + 2**-6)
        return y


@pytest.mark.parametrize("dtype", [DType.FP32, DType.BF16])
def test_the_audit_checks_what_is_promised(tmp_path: pathlib.Path, dtype: DType) -> None:
    model = tiny_model_under_test("LlamaForCausalLM", tmp_path, 1234)
    (kept,) = Auditor(CpuBackend(batch_invariant=True), model, dtype, 1234).run(
        ("batch_invariance",)
    )
    assert kept.passed, kept.detail
    assert kept.metrics["promised"] and kept.detail.startswith("promised in")
    (not_promised,) = Auditor(CpuBackend(batch_invariant=False), model, dtype, 1234).run(
        ("batch_invariance",)
    )
    assert not not_promised.metrics["promised"]
    assert not_promised.detail.startswith(f"not promised by the backend in {dtype.value}")
    (broken,) = Auditor(_Pretender(), model, dtype, 1234).run(("batch_invariance",))
    assert not broken.passed and "differ" in broken.detail, broken.detail
