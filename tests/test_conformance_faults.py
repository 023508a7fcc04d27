"""The conformance suite catches subtle bugs: CPU backends with exactly one planted fault each.

Every faulty backend below subclasses the correct CPU backend and breaks one operator in a
way a kernel author could plausibly get wrong. The operator level must mark that operator
FAILED (and name it); the correct backend passes the same checks. Cases are limited to the
operator under test to keep the run short; the model level is exercised once, end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from llm_conformance import Conformance, OpSuite
from llm_conformance.opsuite import FAILED, PASSED, UNSUPPORTED
from llm_core_cpu import CpuBackend
from llm_hal import AttentionMetadata, DType, SamplingMetadata, UnsupportedOpError
from llm_hal.backend import CapturedGraph, Tensor

SEED = 1234


def _attend(
    backend: CpuBackend,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    out: Tensor | None,
    *,
    causal_shift: int = 0,
    head_map: str = "div",
    subtract_max: bool = True,
) -> torch.Tensor:
    """Paged attention in plain torch, with three knobs to plant a bug: ``causal_shift`` lets a
    token see that many future keys; ``head_map="mod"`` maps query head h to KV head h % Hkv;
    ``subtract_max=False`` takes exp(score) as it is, as a naive softmax does."""
    hkv, d = key_cache.shape[2], key_cache.shape[3]
    q_all = query.reshape(query.shape[0], -1, d).float()  # (T, Hq, D)
    hq = q_all.shape[1]
    heads = torch.arange(hq)
    kv_of = heads % hkv if head_map == "mod" else heads // (hq // hkv)
    result = torch.empty(q_all.shape, dtype=torch.float32)
    starts = meta.query_start_loc
    for b in range(meta.num_seqs):
        q0, q1 = int(starts[b]), int(starts[b + 1])
        length = int(meta.seq_lens[b])
        k = backend._gather_context(key_cache, meta.block_tables[b], length).float()[:, kv_of]
        v = backend._gather_context(value_cache, meta.block_tables[b], length).float()[:, kv_of]
        scores = torch.einsum("qhd,khd->hqk", q_all[q0:q1], k) * scale  # (Hq, Lq, L)
        if logits_soft_cap:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        q_pos = torch.arange(length - (q1 - q0), length).unsqueeze(1)
        k_pos = torch.arange(length).unsqueeze(0)
        allowed = k_pos <= q_pos + causal_shift
        if sliding_window:
            allowed &= k_pos > q_pos - sliding_window
        if subtract_max:
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        else:  # exp(s) / sum exp(s): inf / inf once a score passes ~88
            e = torch.exp(scores).masked_fill(~allowed, 0.0)
            probs = e / e.sum(dim=-1, keepdim=True)
        result[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v)
    y = result.reshape(query.shape[0], hq * d).to(query.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


class CausalMaskOffByOne(CpuBackend):
    """Prefill attention lets each new token see the next one too (``<=`` off by one)."""

    name: ClassVar[str] = "faulty-mask"

    def paged_attention_prefill(
        self,
        query,
        key_cache,
        value_cache,
        meta,
        scale,
        sliding_window=None,
        logits_soft_cap=None,
        out=None,
    ):  # type: ignore[no-untyped-def]
        return _attend(
            self,
            query,
            key_cache,
            value_cache,
            meta,
            scale,
            sliding_window,
            logits_soft_cap,
            out,
            causal_shift=1,
        )


class GqaModulo(CpuBackend):
    """Decode attention maps query head h to KV head ``h % Hkv`` instead of ``h // (Hq/Hkv)``."""

    name: ClassVar[str] = "faulty-gqa"

    def paged_attention_decode(
        self,
        query,
        key_cache,
        value_cache,
        meta,
        scale,
        sliding_window=None,
        logits_soft_cap=None,
        out=None,
    ):  # type: ignore[no-untyped-def]
        return _attend(
            self,
            query,
            key_cache,
            value_cache,
            meta,
            scale,
            sliding_window,
            logits_soft_cap,
            out,
            head_map="mod",
        )


class SoftmaxWithoutMax(CpuBackend):
    """Both attention ops take exp(score) without subtracting the running maximum: right for
    scores near 1, inf / inf = NaN once a score passes ~88 (fp32)."""

    name: ClassVar[str] = "faulty-softmax-max"

    def paged_attention_prefill(
        self,
        query,
        key_cache,
        value_cache,
        meta,
        scale,
        sliding_window=None,
        logits_soft_cap=None,
        out=None,
    ):  # type: ignore[no-untyped-def]
        return _attend(
            self,
            query,
            key_cache,
            value_cache,
            meta,
            scale,
            sliding_window,
            logits_soft_cap,
            out,
            subtract_max=False,
        )

    paged_attention_decode = paged_attention_prefill


class MissedResidual(CpuBackend):
    """The fused rms_norm forgets to add the residual (returns ``x`` as the new residual)."""

    name: ClassVar[str] = "faulty-residual"

    def rms_norm(self, x, weight, eps, residual=None, out=None):  # type: ignore[no-untyped-def]
        y, _ = super().rms_norm(x, weight, eps, None, out)
        return y, (None if residual is None else x)


class EpsOutsideSqrt(CpuBackend):
    """rms_norm computes ``x / (sqrt(mean(x^2)) + eps)``, not ``x / sqrt(mean(x^2) + eps)``."""

    name: ClassVar[str] = "faulty-eps"

    def rms_norm(self, x, weight, eps, residual=None, out=None):  # type: ignore[no-untyped-def]
        s = x if residual is None else (x.float() + residual.float()).to(x.dtype)
        sf = s.float()
        normed = (sf / (sf.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps)).to(x.dtype)
        y = (normed.float() * weight.float()).to(x.dtype)
        if out is not None:
            out.copy_(y)
            y = out
        return y, (None if residual is None else s)


class CacheWritesOnePast(CpuBackend):
    """reshape_and_cache also writes the last token into the slot after its own."""

    name: ClassVar[str] = "faulty-cache"

    def reshape_and_cache(self, key, value, key_cache, value_cache, meta):  # type: ignore[no-untyped-def]
        super().reshape_and_cache(key, value, key_cache, value_cache, meta)
        last = int(meta.slot_mapping[-1])
        hkv, d = key_cache.shape[2], key_cache.shape[3]
        if 0 <= last < key_cache.shape[0] * key_cache.shape[1] - 1:
            key_cache.view(-1, hkv, d)[last + 1] = key[-1].reshape(hkv, d)
            value_cache.view(-1, hkv, d)[last + 1] = value[-1].reshape(hkv, d)


def _filter(
    logits: torch.Tensor,
    meta: SamplingMetadata,
    *,
    top_k_shift: int = 0,
    top_p_counts_own: bool = False,
    min_p_shift: int = 0,
) -> torch.Tensor:
    """The sampling filters in plain torch, with three knobs to plant a bug: ``top_k_shift``
    keeps that many more (negative: fewer) than k tokens; ``top_p_counts_own`` drops the token
    whose own probability crosses p; ``min_p_shift`` keeps that many more (fewer) tokens than
    reach min_p times the largest probability."""
    x = logits.float() / torch.from_numpy(meta.temperature).float().clamp_min(1e-6).unsqueeze(1)
    vocab = x.shape[1]
    top_k = torch.from_numpy(meta.top_k).long()
    k = torch.where(top_k > 0, (top_k + top_k_shift).clamp(1, vocab), vocab)
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    x = x.masked_fill(x < sorted_x.gather(1, (k - 1).unsqueeze(1)), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    sorted_p = probs.gather(1, order)
    before = sorted_p.cumsum(dim=-1) - (0 if top_p_counts_own else sorted_p)
    drop_sorted = before >= torch.from_numpy(meta.top_p).float().unsqueeze(1)
    drop_sorted[:, 0] = False
    probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0)
    floor = torch.from_numpy(meta.min_p).float().unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    # The min-p set is a prefix of the sorted order: keep its length, shifted.
    n = (probs >= floor).sum(dim=-1, keepdim=True)
    if min_p_shift:
        n = torch.where(floor > 0, (n + min_p_shift).clamp(min=1), n)
    rank = torch.empty_like(order).scatter(1, order, torch.arange(vocab).expand_as(order))
    probs = probs.masked_fill(rank >= n, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


class TopKOneTooFew(CpuBackend):
    """top-k keeps k - 1 tokens (the k-th largest is taken at index k - 2)."""

    name: ClassVar[str] = "faulty-top-k"

    def filtered_probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        return _filter(logits, meta, top_k_shift=-1)


class TopPOneTooFew(CpuBackend):
    """top-p counts the candidate's own probability: the token that crosses p is dropped."""

    name: ClassVar[str] = "faulty-top-p"

    def filtered_probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        return _filter(logits, meta, top_p_counts_own=True)


class MinPOneTooFew(CpuBackend):
    """min-p keeps one token fewer than reach the threshold (the last one is dropped)."""

    name: ClassVar[str] = "faulty-min-p"

    def filtered_probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        return _filter(logits, meta, min_p_shift=-1)


def _truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32) & -65536  # keep the top 16 bits
    return bits.view(torch.float32).to(torch.bfloat16)


class Bf16Truncation(CpuBackend):
    """silu_and_mul rounds its bf16 result by truncation instead of to nearest."""

    name: ClassVar[str] = "faulty-bf16"

    def silu_and_mul(self, x, out=None):  # type: ignore[no-untyped-def]
        if x.dtype != torch.bfloat16:
            return super().silu_and_mul(x, out)
        gate, up = x.float().chunk(2, dim=-1)
        y = _truncate_to_bf16(F.silu(gate) * up)
        if out is None:
            return y
        return out.copy_(y)


class AddWritesOnePast(CpuBackend):
    """add with ``out=`` also writes one element past the end of each row of ``out``."""

    name: ClassVar[str] = "faulty-add"

    def add(self, a, b, out=None):  # type: ignore[no-untyped-def]
        y = super().add(a, b, out)
        if out is not None:
            rows, n = out.shape
            torch.as_strided(out, (rows, n + 1), out.stride(), out.storage_offset())[:, n] = 0
        return y


def _allowed(bitmask: torch.Tensor, bit_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(B, 32 * W) bool: the tokens a mask allows, with ``bit_of`` reading the 32 bits of each
    int32 word ((B, W, 1) -> (B, W, 32))."""
    return bit_of(bitmask.to(torch.int32).unsqueeze(-1)).reshape(bitmask.shape[0], -1).bool()


def _lsb_first(words: torch.Tensor) -> torch.Tensor:
    return (words >> torch.arange(32, dtype=torch.int32)) & 1


def _msb_first(words: torch.Tensor) -> torch.Tensor:
    return (words >> (31 - torch.arange(32, dtype=torch.int32))) & 1


def _signed_test(words: torch.Tensor) -> torch.Tensor:
    return (words & (1 << torch.arange(32, dtype=torch.int32))) > 0


class BitmaskMsbFirst(CpuBackend):
    """Reads token t from bit 31 - t % 32 of its word (the bit order of a big-endian bitset)."""

    name: ClassVar[str] = "faulty-bit-order"

    def apply_token_bitmask(self, logits, bitmask):  # type: ignore[no-untyped-def]
        allowed = _allowed(bitmask, _msb_first)[:, : logits.shape[1]]
        return logits.masked_fill_(~allowed, float("-inf"))


class BitmaskSignBitClear(CpuBackend):
    """Tests bit k as ``(word & (1 << k)) > 0`` in int32: bit 31 makes that negative, so it
    always reads as clear and token 31 of every word is banned."""

    name: ClassVar[str] = "faulty-sign-bit"

    def apply_token_bitmask(self, logits, bitmask):  # type: ignore[no-untyped-def]
        allowed = _allowed(bitmask, _signed_test)[:, : logits.shape[1]]
        return logits.masked_fill_(~allowed, float("-inf"))


class BitmaskWholeLastWord(CpuBackend):
    """Treats the partial last word like the others: writes -inf past the vocabulary, into
    the next row (after the last row, into whatever follows in the storage)."""

    name: ClassVar[str] = "faulty-last-word"

    def apply_token_bitmask(self, logits, bitmask):  # type: ignore[no-untyped-def]
        rows, cols = torch.nonzero(~_allowed(bitmask, _lsb_first), as_tuple=True)
        offset = logits.storage_offset()
        size = logits.untyped_storage().nbytes() // logits.element_size() - offset
        flat = torch.as_strided(logits, (size,), (1,))  # from the first element to the end
        where = rows * logits.stride(0) + cols
        flat[where[where < size]] = float("-inf")
        return logits


class _NoReplay(CapturedGraph):
    def replay(self) -> None:
        return None


class StaleGraph(CpuBackend):
    """Captures decode steps into a graph whose replay does nothing: every replayed step
    returns the logits of the step it was captured on."""

    name: ClassVar[str] = "faulty-graph"

    def capture_graph(self, fn: Callable[[], object]) -> CapturedGraph | None:
        fn()
        return _NoReplay()


class WithoutSilu(CpuBackend):
    """Lacks silu_and_mul, and says so."""

    name: ClassVar[str] = "no-silu"

    def supports(self, op: str, dtype: DType | None = None, **shape: Any) -> bool:
        return op != "silu_and_mul" and super().supports(op, dtype, **shape)

    def silu_and_mul(self, x, out=None):  # type: ignore[no-untyped-def]
        raise UnsupportedOpError(self.name, "silu_and_mul")


class ClaimsNoGeluButRuns(CpuBackend):
    """Declares gelu unsupported, yet computes it: a wrong capability declaration."""

    name: ClassVar[str] = "lying-gelu"

    def supports(self, op: str, dtype: DType | None = None, **shape: Any) -> bool:
        return op != "gelu" and super().supports(op, dtype, **shape)


FAULTS = [
    pytest.param(CausalMaskOffByOne, "paged_attention_prefill", DType.FP32, id="causal-mask"),
    pytest.param(GqaModulo, "paged_attention_decode", DType.FP32, id="gqa-head-map"),
    pytest.param(SoftmaxWithoutMax, "paged_attention_prefill", DType.FP32, id="softmax-no-max"),
    pytest.param(
        SoftmaxWithoutMax, "paged_attention_decode", DType.BF16, id="softmax-no-max-decode"
    ),
    pytest.param(MissedResidual, "rms_norm", DType.FP32, id="missed-residual"),
    pytest.param(EpsOutsideSqrt, "rms_norm", DType.FP32, id="eps-outside-sqrt"),
    pytest.param(CacheWritesOnePast, "reshape_and_cache", DType.BF16, id="cache-one-past"),
    pytest.param(Bf16Truncation, "silu_and_mul", DType.BF16, id="bf16-truncation"),
    pytest.param(AddWritesOnePast, "add", DType.FP32, id="out-of-bounds-write"),
    pytest.param(ClaimsNoGeluButRuns, "gelu", DType.FP32, id="false-declaration"),
    pytest.param(BitmaskMsbFirst, "apply_token_bitmask", DType.FP32, id="bitmask-bit-order"),
    pytest.param(BitmaskSignBitClear, "apply_token_bitmask", DType.FP32, id="bitmask-sign-bit"),
    pytest.param(BitmaskWholeLastWord, "apply_token_bitmask", DType.FP32, id="bitmask-last-word"),
]


@pytest.mark.parametrize(("backend_class", "op", "dtype"), FAULTS)
def test_a_planted_fault_fails_its_operator(backend_class: type, op: str, dtype: DType) -> None:
    faulty = OpSuite(backend_class(), [dtype], SEED).result(op, dtype)
    assert faulty.status == FAILED, f"{backend_class.__name__} was not caught"
    failure = faulty.failed_cases[0]
    assert failure.op == op
    assert f"--op {op} " in failure.replay_command(backend_class.name, SEED)
    correct = OpSuite(CpuBackend(), [dtype], SEED).result(op, dtype)
    assert correct.status != FAILED or _only_nan_parity(correct), correct.failed_cases[0].summary()


def _only_nan_parity(result: Any) -> bool:
    """The CPU backend's own known defect (torch SDPA drops NaN in short causal prefills):
    everything else of the operator must pass."""
    return all("NaN parity" in c.summary() for c in result.failed_cases)


def test_the_truncation_fault_is_caught_by_the_bias_check() -> None:
    result = OpSuite(Bf16Truncation(), [DType.BF16], SEED).result("silu_and_mul", DType.BF16)
    summaries = " ".join(c.summary() for c in result.failed_cases)
    assert "rounding bias" in summaries and "toward zero" in summaries
    assert "out of bounds" not in summaries  # the elementwise bound alone would let it pass


def test_an_out_of_bounds_write_is_caught_by_the_guard() -> None:
    result = OpSuite(AddWritesOnePast(), [DType.FP32], SEED).result("add", DType.FP32)
    checks = [c for case in result.failed_cases for c in case.failures]
    assert {c.name for c in checks} == {"out= guard"}
    assert "sentinel values overwritten" in checks[0].detail


def test_a_mask_written_past_the_vocabulary_is_caught_by_the_guard() -> None:
    result = OpSuite(BitmaskWholeLastWord(), [DType.FP32], SEED).result(
        "apply_token_bitmask", DType.FP32
    )
    checks = {c.name for case in result.failed_cases for c in case.failures}
    assert "guard columns" in checks


def test_the_cache_fault_is_caught_bit_exactly() -> None:
    result = OpSuite(CacheWritesOnePast(), [DType.FP32], SEED).result(
        "reshape_and_cache", DType.FP32
    )
    assert result.status == FAILED
    assert any("not bit-exact" in c.summary() for c in result.failed_cases)


def test_top_p_keeping_one_token_too_few_fails_the_distribution_test() -> None:
    suite = OpSuite(TopPOneTooFew(), [DType.FP32], SEED)
    from llm_conformance.cases import specs
    from llm_conformance.opsuite import run_case

    spec = specs()["sample"]
    top_p_case = next(
        i for i, p in enumerate(spec.cases) if p.get("top_p_keeps") and not p.get("top_k")
    )
    faulty = run_case(suite.backend, spec, top_p_case, DType.FP32, SEED)
    assert faulty.status == FAILED
    assert "total variation" in faulty.summary()
    correct = run_case(CpuBackend(), spec, top_p_case, DType.FP32, SEED)
    assert correct.status == PASSED, correct.summary()


def test_large_scores_are_what_catches_a_softmax_without_max() -> None:
    """Every other attention case keeps scores near 1, where exp() without the maximum is
    fine: only the large-score cases fail it, with NaN where the reference has a number."""
    result = OpSuite(SoftmaxWithoutMax(), [DType.FP32], SEED).result(
        "paged_attention_prefill", DType.FP32
    )
    assert {c.params.get("scores") for c in result.failed_cases} == {"large"}
    assert all("NaN parity" in c.summary() for c in result.failed_cases)


def _support_case(rows: str) -> int:
    from llm_conformance.cases import specs

    cases = specs()["sample"].cases
    return next(i for i, p in enumerate(cases) if p.get("rows") == rows)


SAMPLING_FAULTS = [
    pytest.param(TopKOneTooFew, "top_k", id="top-k-keeps-k-1"),
    pytest.param(TopPOneTooFew, "top_p", id="top-p-drops-boundary"),
    pytest.param(MinPOneTooFew, "min_p", id="min-p-one-too-few"),
]


@pytest.mark.parametrize(("backend_class", "rows"), SAMPLING_FAULTS)
def test_a_filter_one_token_short_fails_the_support_check(backend_class: type, rows: str) -> None:
    from llm_conformance.cases import specs
    from llm_conformance.opsuite import run_case

    spec = specs()["sample"]
    faulty = run_case(backend_class(), spec, _support_case(rows), DType.FP32, SEED)
    assert faulty.status == FAILED and faulty.op == "sample"
    assert "--op sample " in faulty.replay_command(backend_class.name, SEED)
    assert "every kept token drawn as often as its probability" in faulty.summary()
    assert "drawn 0 times" in faulty.summary()  # the boundary token, never drawn


def test_the_correct_sampler_passes_every_support_case() -> None:
    from llm_conformance.cases import specs
    from llm_conformance.opsuite import run_case

    spec = specs()["sample"]
    for index, params in enumerate(spec.cases):
        if params["kind"] == "support":
            result = run_case(CpuBackend(), spec, index, DType.FP32, SEED)
            assert result.status == PASSED, (params["rows"], result.summary())


def test_a_missing_operator_is_unsupported_and_so_is_the_model() -> None:
    backend = WithoutSilu()
    op = OpSuite(backend, [DType.FP32], SEED).result("silu_and_mul", DType.FP32)
    assert op.status == UNSUPPORTED and not op.declared_supported
    with Conformance([backend], ["llama"], ["float32"], seed=SEED, quick=True, audits=False) as run:
        certificate = run.run()
    (cell,) = certificate["cells"]
    assert cell["status"] == "UNSUPPORTED"
    assert "silu_and_mul" in " ".join(cell["reasons"])
    assert certificate["summary"]["exit_status"] == 1


def test_a_faulty_backend_fails_its_model_cells_naming_the_operator() -> None:
    with Conformance(
        [MissedResidual()], ["qwen3"], ["float32"], seed=SEED, quick=True, audits=False
    ) as run:
        certificate = run.run()
    (cell,) = certificate["cells"]
    assert cell["status"] == "FAILED"
    reasons = " ".join(cell["reasons"])
    assert "operator rms_norm failed" in reasons
    assert "teacher-forced" in reasons  # the model level sees it too
    assert "rms_norm" in cell["traced_ops"]
    assert certificate["summary"]["exit_status"] == 1


def test_recording_backend_delegates_and_counts() -> None:
    from llm_conformance import RecordingBackend

    inner = CpuBackend()
    recorder = RecordingBackend(inner)
    x = recorder.from_host(np.ones((2, 4), dtype=np.float32))
    y, _ = recorder.rms_norm(x, recorder.from_host(np.ones(4, dtype=np.float32)), 1e-6)
    assert recorder.name == "cpu" and recorder.float_dtypes == inner.float_dtypes
    assert recorder.supports("rms_norm", DType.FP32)
    assert recorder.traced_ops == ["from_host", "rms_norm"]
    assert torch.allclose(recorder.to_host(y), torch.ones(2, 4))


def test_a_graph_that_replays_wrongly_fails_the_capture_audit(tmp_path: Any) -> None:
    from llm_conformance.audits import Auditor
    from llm_conformance.models import tiny_model_under_test

    model = tiny_model_under_test("LlamaForCausalLM", tmp_path, SEED)
    (stale,) = Auditor(StaleGraph(), model, DType.FP32, SEED).run(("graph_capture",))
    assert not stale.passed and "differs at token" in stale.detail
    (correct,) = Auditor(CpuBackend(), model, DType.FP32, SEED).run(("graph_capture",))
    assert correct.passed, correct.detail
