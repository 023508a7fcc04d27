"""Speculative decoding (ngram and draft-model proposals) against the same engine without it.

Verification must be invisible in the output: greedy tokens are the same with and without
speculation, seeded sampling draws the same tokens, unseeded sampling draws from exactly the
target's distribution (a chi-square test against probabilities computed with transformers), and
every stop condition, penalty, logprob, KV block and batching rule behaves as without it. The
tiny random checkpoints of ``conftest_loaders`` carry most cases; the demo model (SmolLM2-135M,
in float32 so that no near-tie can flip between batch shapes) runs the realistic ones.
"""

from __future__ import annotations

import copy
import itertools
import json
import pathlib
import random
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from conftest_loaders import TINY_ARCHITECTURES, build_tiny_tokenizer, save_tiny_hf_checkpoint
from llm_core import LLM, GuidedDecodingParams, SamplingParams
from llm_core.engine.llm_engine import LLMEngine
from llm_core.engine.sequence import Sequence
from llm_core.engine.speculative import (
    MAX_SPECULATIVE_TOKENS,
    SpecStats,
    SpeculativeConfig,
    accept_draws,
    ngram_propose,
)
from llm_core.outputs import RequestOutput
from llm_hal import PenaltyMetadata, SamplingMetadata, get_registry
from llm_hal.reference import TorchBackend
from transformers import PreTrainedModel

Spec = dict[str, Any] | None

#: Tiny prompts: repetitive ones (ngram proposals get accepted) and unstructured ones.
TINY_PROMPTS = [
    [5, 17, 99, 23, 181, 7, 64],
    [40, 41, 42, 43, 40, 41, 42, 43, 40, 41, 42, 43, 40, 41],
    [250, 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71],
    [9, 9, 9, 9, 9, 9, 9, 9],
    [42],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 11, 12, 13, 14, 15],
]
#: Demo-model prompts: input-grounded (code, lists, dialogue: ngram proposals accepted) and free.
DEMO_PROMPTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n"
    "def fib_memo(n, memo={}):\n",
    "Repeat after me: the cat sat on the mat. The cat sat on the mat. The cat sat on the mat. "
    "The cat",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Alice: Hello Bob!\nBob: Hello Alice!\nAlice: How are you?\nBob: I am fine, thank you.\n"
    "Alice: How are you?\nBob:",
    "The capital of France is",
    "Once upon a time, in a small village,",
    "Summarize: The quick brown fox jumps over the lazy dog. The quick brown fox is quick and "
    "brown. Summary: The quick brown fox",
    "Translate to French: I love apples.",
    "<ul>\n  <li>apple</li>\n  <li>banana</li>\n  <li>cherry</li>\n  <li>",
    "Q: What is 2 + 2?\nA: 4\nQ: What is 3 + 3?\nA: 6\nQ: What is 4 + 4?\nA:",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def ngram(k: int = 4, lookup_max: int = 4) -> dict[str, Any]:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": lookup_max}


def draft(path: pathlib.Path, k: int = 4) -> dict[str, Any]:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k}


def make_llm(path: pathlib.Path, spec: Spec = None, **kwargs: Any) -> LLM:
    kwargs.setdefault("kv_cache_memory", "4MiB")
    return LLM(str(path), dtype="float32", load_progress=False, speculative_config=spec, **kwargs)


def run(llm: LLM, prompts: list[Any], params: Any = GREEDY) -> list[RequestOutput]:
    items = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
    return llm.generate(items, params, use_tqdm=False)


def summary(outputs: list[RequestOutput]) -> list[list[tuple[Any, ...]]]:
    """What a request visibly produced, per completion (logprobs compared apart, with a
    tolerance)."""
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs
    ]


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_blocks_released(engine: LLMEngine, seqs: list[Sequence] | None = None) -> None:
    """Every KV block is free or evictable (no reference left) and no sequence holds one."""
    bm = engine.block_manager
    assert not engine.scheduler.has_unfinished
    assert bm.num_available_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert all(not s.block_table for s in seqs or [])


def assert_stats_consistent(stats: SpecStats) -> None:
    assert 0 <= stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.num_draft_tokens <= stats.k * stats.num_drafts
    per_pos = stats.accepted_per_pos
    assert len(per_pos) == stats.k and sum(per_pos) == stats.num_accepted_tokens
    assert all(a >= b for a, b in itertools.pairwise(per_pos)), per_pos  # a prefix is accepted
    assert per_pos[0] <= stats.num_drafts
    if stats.num_drafts:
        rate = stats.num_accepted_tokens / stats.num_draft_tokens
        assert stats.acceptance_rate == pytest.approx(rate)
        mean = 1 + stats.num_accepted_tokens / stats.num_drafts
        assert stats.mean_acceptance_length == pytest.approx(mean)


class Observed:
    """Watches an engine's scheduler: the sequences it saw, how many it preempted, the steps
    that verified proposals, and the scheduled sequences that sampled (each emits one token
    plus its accepted proposals). The decisions are the scheduler's own, only recorded."""

    def __init__(self, engine: LLMEngine):
        self.seqs: dict[int, Sequence] = {}
        self.preempted = 0
        self.verified_steps = 0
        self.sampled_seqs = 0
        schedule = engine.scheduler.schedule

        def observe() -> Any:
            out = schedule()
            self.preempted += len(out.preempted)
            self.verified_steps += any(item.num_spec for item in out.scheduled)
            self.sampled_seqs += sum(item.produces_logits for item in out.scheduled)
            for item in out.scheduled:
                self.seqs[item.seq.seq_id] = item.seq
            return out

        engine.scheduler.schedule = observe  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, PreTrainedModel]:
    """A tiny llama with next-token distributions as peaked as a trained model's."""
    path = tmp_path_factory.mktemp("target")
    return path, save_tiny_hf_checkpoint(path, "llama", logit_scale=25.0)


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Another architecture with other random weights and the same tokenizer: it rarely
    proposes what the target would."""
    path = tmp_path_factory.mktemp("other-draft")
    save_tiny_hf_checkpoint(path, "qwen2", seed=3, logit_scale=25.0)
    return path


@pytest.fixture(scope="module")
def noisy_draft(
    target: tuple[pathlib.Path, PreTrainedModel], tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """The target with noise on every weight: it agrees with the target about 40% of the time."""
    model = copy.deepcopy(target[1])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(0.3 * w.std() * torch.randn(w.shape, generator=gen))
    path = tmp_path_factory.mktemp("noisy-draft")
    model.save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(target: tuple[pathlib.Path, PreTrainedModel]) -> LLM:
    """The target without speculation: the reference of every comparison."""
    return make_llm(target[0])


@pytest.fixture(scope="module")
def demo_plain(default_model_file: pathlib.Path) -> LLM:
    return make_llm(default_model_file, kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def demo_ngram(default_model_file: pathlib.Path) -> LLM:
    return make_llm(default_model_file, ngram(4), kv_cache_memory="64MiB")


DEMO_GREEDY = SamplingParams(temperature=0.0, max_tokens=32, logprobs=3)


@pytest.fixture(scope="module")
def demo_reference(demo_plain: LLM) -> list[RequestOutput]:
    return run(demo_plain, DEMO_PROMPTS, DEMO_GREEDY)


# ----------------------------------------------------------------------------------------------
# 1. greedy output is unchanged
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 8])
def test_demo_greedy_is_unchanged_by_ngram_speculation(
    k: int,
    default_model_file: pathlib.Path,
    demo_ngram: LLM,
    demo_reference: list[RequestOutput],
) -> None:
    """Ten prompts in one batch, EOS ending some of them (ignore_eos is off): the same
    tokens, text, finish reasons and top-3 logprobs of every emitted token."""
    llm = demo_ngram if k == 4 else make_llm(default_model_file, ngram(k), kv_cache_memory="64MiB")
    before = copy.deepcopy(llm.llm_engine.spec_stats)
    outputs = run(llm, DEMO_PROMPTS, DEMO_GREEDY)
    assert summary(outputs) == summary(demo_reference)
    assert_logprobs_close(outputs, demo_reference)
    assert {o.outputs[0].finish_reason for o in outputs} == {"stop", "length"}
    stats = llm.llm_engine.spec_stats
    assert_stats_consistent(stats)
    assert stats.num_accepted_tokens - before.num_accepted_tokens > 20  # input-grounded prompts
    assert stats.acceptance_rate < 0.8  # and the free ones are not
    assert stats.accepted_per_pos[k - 1] > 0  # some verification accepted all k proposals
    assert_blocks_released(llm.llm_engine)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_tiny_greedy_is_unchanged_by_ngram_speculation(
    k: int, target: tuple[pathlib.Path, PreTrainedModel], plain: LLM
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    llm = make_llm(target[0], ngram(k, lookup_max=3))
    outputs, reference = run(llm, TINY_PROMPTS, params), run(plain, TINY_PROMPTS, params)
    assert summary(outputs) == summary(reference)
    assert_logprobs_close(outputs, reference)
    assert llm.llm_engine.spec_stats.num_accepted_tokens > 0  # a random model loops: accepted
    assert_stats_consistent(llm.llm_engine.spec_stats)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_every_family_is_unchanged_by_speculation(
    arch: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Multi-token decodes through every family's attention: GQA, explicit head sizes, sliding
    windows and soft-caps (Gemma), partial rotary (Phi-3, GLM-4)."""
    path = tmp_path_factory.mktemp(arch)
    save_tiny_hf_checkpoint(path, arch, logit_scale=25.0)
    prompts = [TINY_PROMPTS[0] * 3, TINY_PROMPTS[1], TINY_PROMPTS[4]]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=1)
    reference = run(make_llm(path), prompts, params)
    for spec in (ngram(4), draft(path, k=4)):
        outputs = run(make_llm(path, spec), prompts, params)
        assert summary(outputs) == summary(reference), spec
        assert_logprobs_close(outputs, reference)


def test_longrope_verification_never_crosses_the_rope_switch(
    tmp_path: pathlib.Path,
) -> None:
    """LongRoPE switches every position to its long factors once a sequence grows past 32
    tokens, by recomputing it: a verification must stop at the switch, or its last rows would
    read keys rotated for a short sequence."""
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "short_factor": [1.0 + 0.1 * i for i in range(6)],
        "long_factor": [2.0 + 0.5 * i for i in range(6)],
        "original_max_position_embeddings": 32,
    }
    overrides = {"original_max_position_embeddings": 32, "rope_parameters": rope}
    save_tiny_hf_checkpoint(tmp_path, "phi3", logit_scale=25.0, overrides=overrides)
    prompts = [TINY_PROMPTS[0] * 3, [40, 41, 42, 43] * 6, [9] * 28, TINY_PROMPTS[5]]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2)
    reference = run(make_llm(tmp_path), prompts, params)
    for spec in (ngram(4), draft(tmp_path, k=4)):
        llm = make_llm(tmp_path, spec)
        assert llm.llm_engine.model.rope_switch_length == 32
        outputs = run(llm, prompts, params)
        assert summary(outputs) == summary(reference), spec
        assert_logprobs_close(outputs, reference)
        assert llm.llm_engine.spec_stats.num_accepted_tokens > 0


def _opencl_available() -> str | None:
    pytest.importorskip("pyopencl", reason="pyopencl is not installed")
    record = get_registry().records.get("opencl")
    if record is None:
        return "the opencl backend is not installed (llm-core[opencl])"
    availability = record.availability()
    return None if availability.available else f"OpenCL unavailable: {availability.reason}"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_opencl_greedy_is_unchanged_by_speculation(
    arch: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The multi-token decode of a verification on another backend (PoCL here), with ngram
    and draft-model proposals, against the same backend without speculation and the CPU."""
    reason = _opencl_available()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp(f"opencl-{arch}")
    save_tiny_hf_checkpoint(path, arch, logit_scale=25.0)
    prompts = TINY_PROMPTS[:3]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    reference = run(make_llm(path, backend="opencl"), prompts, params)
    assert tokens(reference) == tokens(run(make_llm(path), prompts, params))
    for spec in (ngram(4, lookup_max=3), draft(path, k=3)):
        llm = make_llm(path, spec, backend="opencl")
        outputs = run(llm, prompts, params)
        assert summary(outputs) == summary(reference)
        assert_logprobs_close(outputs, reference, tol=1e-3)
        assert llm.llm_engine.spec_stats.num_accepted_tokens > 0
        assert_blocks_released(llm.llm_engine)


# ----------------------------------------------------------------------------------------------
# 2. draft models
# ----------------------------------------------------------------------------------------------


def test_demo_draft_equal_to_target_accepts_everything(
    default_model_file: pathlib.Path, demo_reference: list[RequestOutput]
) -> None:
    """The target drafting for itself proposes its own greedy tokens: all accepted."""
    llm = make_llm(default_model_file, draft(default_model_file, k=3), kv_cache_memory="64MiB")
    prompts, reference = DEMO_PROMPTS[::2], demo_reference[::2]
    outputs = run(llm, prompts, DEMO_GREEDY)
    assert summary(outputs) == summary(reference)
    assert_logprobs_close(outputs, reference)
    stats = llm.llm_engine.spec_stats
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert "draft_kv_cache_bytes" in llm.llm_engine.memory_report
    assert_blocks_released(llm.llm_engine)


def test_tiny_draft_equal_to_target_emits_k_plus_one_tokens_per_step(
    target: tuple[pathlib.Path, PreTrainedModel], plain: LLM
) -> None:
    """One sequence of 21 tokens with k = 4: the prefill gives one, then four verifications
    of four proposals, each emitting five tokens."""
    path = target[0]
    llm = make_llm(path, draft(path, k=4))
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True)
    engine.add_request("one", TINY_PROMPTS[0], params)
    steps, outputs = 0, []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        steps += 1
    assert steps == 5
    assert outputs[-1].outputs[0].token_ids == tokens(run(plain, TINY_PROMPTS[:1], params))[0]
    stats = engine.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (4, 16, 16)
    assert stats.accepted_per_pos == [4, 4, 4, 4]
    assert stats.mean_acceptance_length == 5.0 and stats.acceptance_rate == 1.0


def test_other_draft_model_gives_the_target_greedy_output(
    target: tuple[pathlib.Path, PreTrainedModel], other_draft: pathlib.Path, plain: LLM
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = make_llm(target[0], draft(other_draft, k=3))
    assert tokens(run(llm, TINY_PROMPTS, params)) == tokens(run(plain, TINY_PROMPTS, params))
    stats = llm.llm_engine.spec_stats
    assert_stats_consistent(stats)
    assert stats.num_draft_tokens > 0 and stats.acceptance_rate < 0.5  # it disagrees often


def test_draft_with_a_shorter_context_than_the_target(
    target: tuple[pathlib.Path, PreTrainedModel], plain: LLM, tmp_path: pathlib.Path
) -> None:
    """A draft trained on 64 positions for a target of 256 (as a 2k-context draft of an
    8k-context target): requests that grow past 64 tokens must still be served as without
    speculation (proposals stop, vLLM's behaviour), or the draft refused at load with a
    message naming the contexts. Failing those requests with finish reason "error" is a bug.
    """
    save_tiny_hf_checkpoint(
        tmp_path, "llama", logit_scale=25.0, overrides={"max_position_embeddings": 64}
    )
    prompts = [[40, 41, 42, 43] * 6, TINY_PROMPTS[0]]
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    try:
        llm = make_llm(target[0], draft(tmp_path, k=3))
    except ValueError as exc:
        assert "64" in str(exc) and ("max_model_len" in str(exc) or "position" in str(exc))
        return
    outputs = run(llm, prompts, params)
    assert [o.error for o in outputs] == [None, None]
    assert summary(outputs) == summary(run(plain, prompts, params))
    assert_blocks_released(llm.llm_engine)


# ----------------------------------------------------------------------------------------------
# 3. sampling: exactly the target's distribution
# ----------------------------------------------------------------------------------------------

#: Samples per case of the distribution test, and its significance level per case.
NUM_SAMPLES = 2000
ALPHA = 1e-3


def _exact_probabilities(
    model: PreTrainedModel, prompt: list[int], params: SamplingParams, depth: int
) -> dict[tuple[int, ...], float]:
    """The target's probability of every continuation of ``depth`` tokens expected at least 5
    times in ``NUM_SAMPLES`` draws: transformers' logits, processed by the HAL reference's
    penalties and filters (the semantics every backend's sampler implements)."""
    ref = TorchBackend("cpu")
    level: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(depth):
        prefixes = list(level)
        b = len(prefixes)
        with torch.no_grad():
            ids = torch.tensor([prompt + list(p) for p in prefixes])
            logits = model(ids).logits[:, -1].float()
        width = max(1, len(prefixes[0]))
        outputs = np.array([list(p) + [-1] * (width - len(p)) for p in prefixes])
        ref.apply_penalties(
            logits,
            PenaltyMetadata(
                prompt_ids=np.tile(np.array(prompt), (b, 1)),
                output_ids=outputs,
                presence=np.full(b, params.presence_penalty),
                frequency=np.full(b, params.frequency_penalty),
                repetition=np.full(b, params.repetition_penalty),
            ),
        )
        probs = ref.filtered_probs(
            logits,
            SamplingMetadata(
                temperature=np.full(b, params.temperature),
                top_k=np.full(b, params.top_k),
                top_p=np.full(b, params.top_p),
                min_p=np.full(b, params.min_p),
                seeds=np.zeros(b),
            ),
        ).double()
        level = {
            (*prefix, t): level[prefix] * probs[i, t].item()
            for i, prefix in enumerate(prefixes)
            for t in torch.nonzero(level[prefix] * probs[i] * NUM_SAMPLES >= 5).flatten().tolist()
        }
    return level


def _chi_square_p_value(
    samples: list[tuple[int, ...]], cells: dict[tuple[int, ...], float]
) -> float:
    """Pearson's goodness-of-fit test of the samples against the cells' probabilities, plus
    one cell for every other continuation."""
    n = len(samples)
    observed = dict.fromkeys(cells, 0)
    rest = 0
    for s in samples:
        if s in observed:
            observed[s] += 1
        else:
            rest += 1
    expected = np.array([p * n for p in cells.values()] + [n * (1 - sum(cells.values()))])
    counts = np.array([*observed.values(), rest])
    assert expected.min() >= 5, "the test needs every cell's expectation >= 5"
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = torch.tensor(len(cells) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))


SHORT_PROMPT = TINY_PROMPTS[0]
#: 200 distinct tokens: whatever the first sampled token, ngram finds it and proposes the next.
LONG_PROMPT = np.random.default_rng(0).permutation(np.arange(3, 300))[:200].tolist()
FREE = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
FILTERED = SamplingParams(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02,
                          repetition_penalty=1.5, max_tokens=3, ignore_eos=True)  # fmt: skip


@pytest.mark.parametrize(
    ("proposer", "prompt", "params"),
    [
        ("noisy-draft", SHORT_PROMPT, FREE),
        ("ngram", LONG_PROMPT, FREE),
        ("target-as-draft", SHORT_PROMPT, FILTERED),
    ],
)
def test_sampling_draws_from_the_target_distribution(
    proposer: str,
    prompt: list[int],
    params: SamplingParams,
    target: tuple[pathlib.Path, PreTrainedModel],
    noisy_draft: pathlib.Path,
) -> None:
    """The joint distribution of the first three sampled tokens with speculation is the
    target's. Token 1 comes from the prefill; token 2 from a verification row (its proposal
    accepted with probability p(proposal), else a draw from the rest); token 3 from the bonus
    row of an accepted verification or from the next step. 2000 unseeded requests (seeds drawn
    by the engine's seeded generator) are compared with the exact probabilities of every
    continuation expected 5 or more times (the rest pooled in one cell) by Pearson's
    chi-square test at ALPHA = 1e-3 per case: a correct engine fails a case with probability
    1e-3, so the three cases together raise a false alarm with probability below 0.3%. (With
    the fixed engine seed the outcome is deterministic; the rate is that of drawing a bad
    seed.) An engine that accepted every proposal fails every case with p < 1e-9."""
    path, model = target
    spec = {
        "noisy-draft": draft(noisy_draft, k=2),
        "ngram": ngram(2),
        "target-as-draft": draft(path, k=2),
    }[proposer]
    llm = make_llm(path, spec, kv_cache_memory="16MiB", seed=1)
    samples = [tuple(t) for t in tokens(run(llm, [prompt] * NUM_SAMPLES, params))]
    stats = llm.llm_engine.spec_stats
    assert stats.num_drafts > NUM_SAMPLES // 3  # most second tokens went through verification
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both outcomes occur
    cells = _exact_probabilities(model, prompt, params, depth=3)
    assert len(cells) >= 20
    p_value = _chi_square_p_value(samples, cells)
    assert p_value > ALPHA, f"speculative samples do not follow the target (p = {p_value:.2e})"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True),
        SamplingParams(
            temperature=0.7,
            top_k=20,
            top_p=0.9,
            min_p=0.01,
            max_tokens=24,
            repetition_penalty=1.2,
            presence_penalty=0.3,
            frequency_penalty=0.2,
            ignore_eos=True,
        ),
    ],
    ids=["free", "filtered-penalized"],
)
def test_seeded_sampling_draws_the_same_tokens(
    params: SamplingParams,
    target: tuple[pathlib.Path, PreTrainedModel],
    noisy_draft: pathlib.Path,
    plain: LLM,
) -> None:
    """Draw ``j`` of a seeded request uses the same seed with and without speculation."""
    path = target[0]
    prompts = [p for p in TINY_PROMPTS for _ in range(4)]
    seeded = [params.clone() for _ in prompts]
    for i, p in enumerate(seeded):
        p.seed = 1000 + i
    reference = tokens(run(plain, prompts, seeded))
    assert len({tuple(t) for t in reference}) == len(prompts)  # the seeds matter
    for spec in (draft(path), draft(noisy_draft, k=3), ngram(3)):
        llm = make_llm(path, spec)
        assert tokens(run(llm, prompts, seeded)) == reference, spec
        assert llm.llm_engine.spec_stats.num_accepted_tokens > 0, spec


# ----------------------------------------------------------------------------------------------
# 4. KV blocks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_kv_blocks_are_released_after_finish_and_abort(
    proposer: str, target: tuple[pathlib.Path, PreTrainedModel], plain: LLM
) -> None:
    path = target[0]
    llm = make_llm(path, ngram(4, lookup_max=3) if proposer == "ngram" else draft(path, k=3))
    engine = llm.llm_engine
    watch = Observed(engine)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    run(llm, TINY_PROMPTS, params)
    assert watch.verified_steps > 0
    assert_blocks_released(engine, list(watch.seqs.values()))

    # Abort two requests in the middle of their generation, after verifications ran.
    for i, prompt in enumerate(TINY_PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    finished: dict[str, RequestOutput] = {}
    for _ in range(4):
        assert not any(out.finished for out in engine.step())
    assert engine.spec_stats.num_drafts > 0
    engine.abort_request(["r1", "r3"])
    while engine.has_unfinished_requests():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    assert sorted(finished) == ["r0", "r2", "r4", "r5"]
    reference = tokens(run(plain, TINY_PROMPTS, params))
    for rid, out in finished.items():
        assert out.outputs[0].token_ids == reference[int(rid[1:])]
    assert_blocks_released(engine, list(watch.seqs.values()))


# ----------------------------------------------------------------------------------------------
# 5. continuous batching
# ----------------------------------------------------------------------------------------------


def test_speculated_and_unspeculated_requests_share_a_batch(
    demo_ngram: LLM, demo_plain: LLM
) -> None:
    """Greedy and seeded requests (speculated), a guided one (never speculated) and one with
    prompt logprobs (speculated once its prompt is scored) in one batch: each gives what it
    gives alone, and what it gives without speculation."""
    prompts = DEMO_PROMPTS[:4]
    params = [
        SamplingParams(temperature=0.0, max_tokens=24),
        SamplingParams(temperature=0.8, seed=11, max_tokens=24),
        SamplingParams(
            temperature=0.0,
            max_tokens=24,
            guided_decoding=GuidedDecodingParams(regex=r"( [a-z]+){1,6}\."),
        ),
        SamplingParams(temperature=0.0, max_tokens=24, prompt_logprobs=2, logprobs=1),
    ]
    engine = demo_ngram.llm_engine
    batch = demo_ngram.generate(prompts, params, use_tqdm=False)
    alone = []
    for prompt, p in zip(prompts, params):
        drafts = engine.spec_stats.num_drafts
        alone += demo_ngram.generate([prompt], p, use_tqdm=False)
        if p.guided_decoding is not None:
            assert engine.spec_stats.num_drafts == drafts  # guided: no proposal verified
        else:
            assert engine.spec_stats.num_drafts > drafts
    without = demo_plain.generate(prompts, params, use_tqdm=False)
    assert summary(batch) == summary(alone) == summary(without)
    assert batch[2].outputs[0].finish_reason == "stop"  # the regex completed
    for got in (batch[3], alone[3]):
        assert_prompt_logprobs_close(got, without[3])
    assert_logprobs_close(batch, without)
    assert_blocks_released(engine)


def _mixed_requests() -> tuple[list[list[int]], list[SamplingParams]]:
    """Random prompts and sampling parameters: greedy and seeded, penalties, top-k, stop
    tokens, min_tokens, EOS, logprobs, n = 2 and max_tokens from 1 to 49."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 40))] for _ in range(10)]
    prompts += [[40, 41, 42, 43] * 6, [9] * 20]
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
            seed=i,
            max_tokens=rng.randrange(1, 50),
            ignore_eos=rng.random() < 0.5,
            min_tokens=rng.choice([0, 0, 3]),
            stop_token_ids=rng.choice([None, [rng.randrange(3, 300)]]),
            top_k=rng.choice([0, 10]),
            repetition_penalty=rng.choice([1.0, 1.2]),
            presence_penalty=rng.choice([0.0, 0.5]),
            logprobs=rng.choice([None, 2]),
            n=rng.choice([1, 1, 2]),
        )
        for i in range(len(prompts))
    ]
    return prompts, params


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"max_num_batched_tokens": 3, "max_num_seqs": 3},
        {"kv_cache_memory": 4 * 16 * 2 * 2 * 2 * 16 * 4, "max_num_batched_tokens": 16},
    ],
    ids=["roomy", "3-token-budget", "4-blocks"],
)
def test_mixed_requests_under_tight_limits(
    limits: dict[str, Any],
    target: tuple[pathlib.Path, PreTrainedModel],
    other_draft: pathlib.Path,
) -> None:
    """Random requests in one batch under a roomy engine, a 3-token step budget (proposals
    cut to what fits, prompts chunked) and a 4-block KV cache (preemptions; sequences that
    outgrow the whole cache end with "length"): each request gives what it gives without
    speculation."""
    path = target[0]
    prompts, params = _mixed_requests()
    reference = run(make_llm(path, **limits), prompts, params)
    for spec in (ngram(4), draft(path, k=4), draft(other_draft, k=2)):
        llm = make_llm(path, spec, **limits)
        watch = Observed(llm.llm_engine)
        outputs = run(llm, prompts, params)
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert watch.preempted > 0 or "kv_cache_memory" not in limits
        assert summary(outputs) == summary(reference), spec
        assert_logprobs_close(outputs, reference)
        assert llm.llm_engine.spec_stats.num_drafts > 0
        assert_stats_consistent(llm.llm_engine.spec_stats)
        assert_blocks_released(llm.llm_engine)


def assert_prompt_logprobs_close(got: RequestOutput, want: RequestOutput) -> None:
    assert got.prompt_logprobs is not None and want.prompt_logprobs is not None
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(got.prompt_token_ids)
    for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert g is not None and w is not None and g.keys() == w.keys()
        assert all(g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4) for t in g)


def assert_logprobs_close(
    got: list[RequestOutput], want: list[RequestOutput], tol: float = 1e-4
) -> None:
    """Every sampled position's logprobs (token and top ones) match, where asked for."""
    for g_req, w_req in zip(got, want, strict=True):
        for g, w in zip(g_req.outputs, w_req.outputs, strict=True):
            if w.logprobs is None:
                assert g.logprobs is None
                continue
            assert g.logprobs is not None
            assert len(g.logprobs) == len(g.token_ids) == len(w.logprobs)
            for g_pos, w_pos in zip(g.logprobs, w.logprobs):
                assert g_pos.keys() == w_pos.keys()
                for t in g_pos:
                    assert g_pos[t].logprob == pytest.approx(w_pos[t].logprob, abs=tol)
                    assert g_pos[t].rank == w_pos[t].rank
            assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=tol * 40)


# ----------------------------------------------------------------------------------------------
# 6. prefix caching and preemption
# ----------------------------------------------------------------------------------------------


def test_prefix_cache_hits_with_speculation(
    target: tuple[pathlib.Path, PreTrainedModel], plain: LLM
) -> None:
    """Prompts sharing two full blocks hit the cache the first one filled; a follow-up turn
    (the first prompt, its output and one more token) hits the blocks that the speculated
    generation filled (their KV computed as accepted proposals); all decode the same tokens
    as without speculation."""
    shared = [(5 * j) % 290 + 7 for j in range(32)]
    prompts = [[*shared, 40 + i, 41, 42, 40 + i, 41] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    reference = tokens(run(plain, prompts, params))
    follow_up = [*prompts[0], *reference[0], 7]
    follow_reference = tokens(run(make_llm(target[0]), [follow_up], params))
    path = target[0]
    for spec in (ngram(4, lookup_max=3), draft(path, k=3)):
        llm = make_llm(path, spec)
        first = run(llm, prompts[:1], params)
        rest = run(llm, prompts[1:], params)
        assert tokens(first + rest) == reference
        assert all(o.num_cached_tokens >= 32 for o in rest)
        assert llm.llm_engine.spec_stats.num_accepted_tokens > 0
        turn = run(llm, [follow_up], params)
        assert tokens(turn) == follow_reference
        assert turn[0].num_cached_tokens == 64  # blocks 3 and 4: mostly generated tokens
        assert_blocks_released(llm.llm_engine)


@pytest.mark.parametrize("proposer", ["ngram", "draft", "other-draft"])
def test_preemption_with_speculation_keeps_outputs(
    proposer: str,
    target: tuple[pathlib.Path, PreTrainedModel],
    other_draft: pathlib.Path,
    plain: LLM,
) -> None:
    """8 KV blocks of 16 tokens for 8 sequences of ~70: sequences are preempted (their draft
    KV too) and recomputed, while the others verify proposals."""
    path = target[0]
    spec = {
        "ngram": ngram(4, lookup_max=3),
        "draft": draft(path, k=4),
        "other-draft": draft(other_draft, k=2),
    }[proposer]
    prompts = [[(7 * i + j) % 290 + 3 for j in range(20 + i)] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = tokens(run(plain, prompts, params))
    # blocks, tokens, k+v, layers, kv heads, head size, fp32
    llm = make_llm(path, spec, kv_cache_memory=8 * 16 * 2 * 2 * 2 * 16 * 4)
    engine = llm.llm_engine
    assert engine.block_manager.num_blocks == 8
    watch = Observed(engine)
    assert tokens(run(llm, prompts, params)) == reference
    assert watch.preempted > 0, "the small cache should have forced preemption"
    assert any(s.num_preemptions for s in watch.seqs.values())
    assert watch.verified_steps > 0 and engine.spec_stats.num_accepted_tokens > 0
    assert_stats_consistent(engine.spec_stats)
    assert_blocks_released(engine, list(watch.seqs.values()))


# ----------------------------------------------------------------------------------------------
# 7. stops and sampling options inside a verified run
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_target(
    target: tuple[pathlib.Path, PreTrainedModel],
    plain: LLM,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pathlib.Path, list[int], int]:
    """The target with its EOS set to the third token of its greedy continuation of a prompt
    (the token appears nowhere before): a copy of the checkpoint with another eos_token_id.
    With the target drafting for itself (k = 4) the first verification accepts the EOS as its
    second proposal, followed by two more proposals and a bonus token that must be dropped."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for prompt in TINY_PROMPTS:
        greedy = tokens(run(plain, [prompt], params))[0]
        if greedy[2] not in [*greedy[:2], 0, 1, 2]:
            break
    else:
        pytest.fail("no prompt whose third greedy token is new")
    path = tmp_path_factory.mktemp("eos-target")
    for f in target[0].iterdir():
        shutil.copy(f, path / f.name)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = greedy[2]
    (path / "config.json").write_text(json.dumps(config))
    return path, prompt, greedy[2]


def test_eos_inside_a_verified_run_ends_the_output(
    eos_target: tuple[pathlib.Path, list[int], int],
) -> None:
    path, prompt, eos = eos_target
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    reference = run(make_llm(path), [prompt], params)
    llm = make_llm(path, draft(path, k=4))
    outputs = run(llm, [prompt], params)
    assert summary(outputs) == summary(reference)
    assert_logprobs_close(outputs, reference)
    out = outputs[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert len(out.token_ids) == 3 and out.token_ids[-1] == eos
    stats = llm.llm_engine.spec_stats
    assert (stats.num_drafts, stats.num_accepted_tokens) == (1, 4)  # tokens after EOS dropped
    assert_blocks_released(llm.llm_engine)


@pytest.mark.parametrize("min_tokens", [2, 3, 5])
def test_min_tokens_bans_eos_per_verification_row(
    min_tokens: int, eos_target: tuple[pathlib.Path, list[int], int]
) -> None:
    """The draft proposes the EOS at output index 2, in a verification of indices 1 to 5.
    Each row bans it by its own index: allowed at index 2 for min_tokens = 2 (the output
    ends there), banned for 3 and 5 (the row rejects the proposal; the EOS may end the
    output from index min_tokens on)."""
    path, prompt, eos = eos_target
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=min_tokens)
    reference = run(make_llm(path), [prompt], params)
    llm = make_llm(path, draft(path, k=4))
    outputs = run(llm, [prompt], params)
    assert summary(outputs) == summary(reference)
    out = outputs[0].outputs[0]
    assert eos not in out.token_ids[:min_tokens]
    stats = llm.llm_engine.spec_stats
    if min_tokens == 2:
        assert out.token_ids[-1] == eos and len(out.token_ids) == 3
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    else:
        assert stats.num_accepted_tokens < stats.num_draft_tokens  # the banned EOS rejected


def test_stop_token_ids_and_stop_strings_inside_a_verified_run(
    target: tuple[pathlib.Path, PreTrainedModel], plain: LLM
) -> None:
    path = target[0]
    llm = make_llm(path, draft(path, k=4))
    free = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    full = run(plain, TINY_PROMPTS, free)
    for prompt, whole in zip(TINY_PROMPTS, full):
        ids, text = whole.outputs[0].token_ids, whole.outputs[0].text
        stop_token = ids[7]
        at = len(text) // 2
        stop = text[at : at + 2]
        cases = [
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                           stop_token_ids=[stop_token]),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop],
                           include_stop_str_in_output=True),
        ]  # fmt: skip
        for params in cases:
            got = run(llm, [prompt], params)
            assert summary(got) == summary(run(plain, [prompt], params)), params
            assert got[0].outputs[0].finish_reason == "stop"
        assert run(llm, [prompt], cases[0])[0].outputs[0].stop_reason == stop_token
    assert llm.llm_engine.spec_stats.acceptance_rate == 1.0
    assert_blocks_released(llm.llm_engine)


def test_demo_stop_string(demo_ngram: LLM, demo_plain: LLM) -> None:
    """A counting prompt: ngram proposals are accepted, and the stop string ends the output
    in the middle of a verified run (EOS ends some of DEMO_PROMPTS above)."""
    prompts = ["1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[" 17,"])
    outputs = run(demo_ngram, prompts, params)
    assert summary(outputs) == summary(run(demo_plain, prompts, params))
    assert outputs[0].outputs[0].text == " 13, 14, 15, 16,"
    assert outputs[0].outputs[0].stop_reason == " 17,"


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 6, 7, 12])
def test_max_tokens_is_exact(
    max_tokens: int, target: tuple[pathlib.Path, PreTrainedModel], plain: LLM
) -> None:
    """k = 4 on highly repetitive prompts, and the target as its own draft: exactly
    max_tokens tokens, and no verification emits a token past them (every token a step
    emitted is output: none was computed to be dropped)."""
    path = target[0]
    prompts = [[40, 41, 42] * 8, [9] * 12]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reference = run(plain, prompts, params)
    for spec in (ngram(4), draft(path, k=4)):
        llm = make_llm(path, spec)
        watch = Observed(llm.llm_engine)
        outputs = run(llm, prompts, params)
        assert summary(outputs) == summary(reference)
        assert all(len(t) == max_tokens for t in tokens(outputs))
        assert all(o.outputs[0].finish_reason == "length" for o in outputs)
        emitted = watch.sampled_seqs + llm.llm_engine.spec_stats.num_accepted_tokens
        assert emitted == 2 * max_tokens
        if max_tokens >= 5 and spec["method"] == "draft_model":
            assert llm.llm_engine.spec_stats.acceptance_rate == 1.0


def test_max_model_len_bounds_verification(target: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path = target[0]
    prompts = [[40, 41, 42] * 8]
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    reference = run(make_llm(path, max_model_len=37), prompts, params)
    llm = make_llm(path, draft(path, k=4), max_model_len=37)
    watch = Observed(llm.llm_engine)
    outputs = run(llm, prompts, params)
    assert summary(outputs) == summary(reference)
    assert len(tokens(outputs)[0]) == 37 - 24
    assert watch.sampled_seqs + llm.llm_engine.spec_stats.num_accepted_tokens == 37 - 24


def test_n_completions(target: tuple[pathlib.Path, PreTrainedModel], plain: LLM) -> None:
    path = target[0]
    llm = make_llm(path, draft(path, k=3))
    for params in (
        SamplingParams(n=2, temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=20, ignore_eos=True, logprobs=1),
    ):
        outputs = run(llm, TINY_PROMPTS[:3], params)
        reference = run(plain, TINY_PROMPTS[:3], params)
        assert summary(outputs) == summary(reference)
        assert_logprobs_close(outputs, reference)
        assert all(len(o.outputs) == 2 for o in outputs)
    assert_blocks_released(llm.llm_engine)


@pytest.mark.parametrize(
    ("repetition", "presence", "frequency"),
    [(1.3, 0.0, 0.0), (1.0, 0.8, 0.0), (1.0, 0.0, 0.6), (1.1, 0.3, 0.3)],
    ids=["repetition", "presence", "frequency", "all"],
)
def test_greedy_penalties(
    repetition: float,
    presence: float,
    frequency: float,
    target: tuple[pathlib.Path, PreTrainedModel],
    plain: LLM,
) -> None:
    """A row of a verification is penalized for the proposals before it too."""
    path = target[0]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                            repetition_penalty=repetition, presence_penalty=presence,
                            frequency_penalty=frequency)  # fmt: skip
    reference = tokens(run(plain, TINY_PROMPTS, params))
    for spec in (ngram(4, lookup_max=2), draft(path, k=4)):
        llm = make_llm(path, spec)
        assert tokens(run(llm, TINY_PROMPTS, params)) == reference, spec
        assert llm.llm_engine.spec_stats.num_drafts > 0


def test_demo_greedy_penalties(demo_ngram: LLM, demo_plain: LLM) -> None:
    prompts = DEMO_PROMPTS[1:3]
    params = SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.2,
                            presence_penalty=0.2, frequency_penalty=0.2)  # fmt: skip
    assert summary(run(demo_ngram, prompts, params)) == summary(run(demo_plain, prompts, params))


# ----------------------------------------------------------------------------------------------
# 8. configuration errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, ["'medusa'", "not supported", "ngram"]),
        ({"num_speculative_tokens": 2}, ["method None", "not supported"]),
        ({"method": "mtp", "num_speculative_tokens": 2}, ["mtp", "DeepSeek"]),
        ({"method": "ngram", "num_speculative_tokens": 0}, ["num_speculative_tokens", "got 0"]),
        ({"method": "ngram", "num_speculative_tokens": 33}, ["num_speculative_tokens", "32"]),
        ({"method": "ngram", "num_speculative_tokens": "4"}, ["num_speculative_tokens", "'4'"]),
        ({"method": "ngram", "num_speculative_tokens": 2.0}, ["num_speculative_tokens", "2.0"]),
        ({"method": "ngram", "num_speculative_tokens": True}, ["num_speculative_tokens"]),
        ({"method": "ngram"}, ["num_speculative_tokens", "None"]),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tp": 1}, ["unknown", "draft_tp"]),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5,
             "prompt_lookup_max": 2},
            ["prompt_lookup_min (5)", "larger", "prompt_lookup_max (2)"],
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0},
            ["prompt_lookup_max", ">= 1"],
        ),
        ({"method": "draft_model", "num_speculative_tokens": 2}, ["draft_model", "'model'"]),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, ["ngram", "no 'model'"]),
        ('{"method": "ngram", num_speculative_tokens: 2}', ["not valid JSON"]),
        ([("method", "ngram")], ["must be a dict", "list"]),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_with_the_reason(value: Any, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        SpeculativeConfig.parse(value)
    for word in words:
        assert word in str(info.value)


def test_configs_parse_like_vllm() -> None:
    text = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}'
    assert SpeculativeConfig.parse(text) == SpeculativeConfig("ngram", 3, 5, 1, None)
    implied = SpeculativeConfig.parse({"model": "/d", "num_speculative_tokens": 2})
    assert implied == SpeculativeConfig("draft_model", 2, 4, 1, "/d")
    assert SpeculativeConfig.parse(implied) is implied
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 32})


def test_llm_refuses_bad_configs_before_loading(
    target: tuple[pathlib.Path, PreTrainedModel],
) -> None:
    path = target[0]
    with pytest.raises(ValueError, match="DeepSeek"):
        make_llm(path, {"method": "mtp", "num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="not valid JSON"):
        make_llm(path, "{ngram}")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        make_llm(path, {"method": "ngram", "num_speculative_tokens": 0})
    llm = make_llm(path, json.dumps(ngram(2)))  # type: ignore[arg-type]
    assert llm.llm_engine.speculative_config == SpeculativeConfig("ngram", 2, 4, 1, None)


def test_draft_with_another_vocabulary_is_refused(
    target: tuple[pathlib.Path, PreTrainedModel], tmp_path: pathlib.Path
) -> None:
    save_tiny_hf_checkpoint(tmp_path, "llama", seed=2, overrides={"vocab_size": 320})
    with pytest.raises(ValueError, match="vocabulary of 320 tokens, the target 300"):
        make_llm(target[0], draft(tmp_path))


# ----------------------------------------------------------------------------------------------
# 9. ngram_propose and accept_draws
# ----------------------------------------------------------------------------------------------


def test_ngram_prefers_the_longest_match() -> None:
    tokens_ = [7, 8, 9, 1, 5, 9, 2, 7, 8, 9]
    assert ngram_propose(tokens_, 2, 1, 3) == [1, 5]  # [7, 8, 9] matched at 0
    assert ngram_propose(tokens_, 2, 1, 1) == [2, 7]  # [9] most recently at 5
    assert ngram_propose(tokens_, 2, 1, 2) == [1, 5]  # [8, 9] only at 1


def test_ngram_takes_the_most_recent_occurrence() -> None:
    tokens_ = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3]
    assert ngram_propose(tokens_, 2, 1, 3) == [5, 1]
    assert ngram_propose(tokens_, 3, 3, 3) == [5, 1, 2]


def test_ngram_proposes_fewer_near_the_end() -> None:
    assert ngram_propose([1, 2, 3, 1], 5, 1, 4) == [2, 3, 1]
    assert ngram_propose([4, 4, 4], 3, 1, 2) == [4]  # [4, 4] at 0: one token follows
    assert ngram_propose([6, 6], 4, 1, 4) == [6]


def test_ngram_without_a_match_proposes_nothing() -> None:
    assert ngram_propose([1, 2, 3, 4], 3, 1, 4) == []
    assert ngram_propose([1, 2, 9, 1, 3, 2], 3, 2, 4) == []  # [3, 2] absent; [2] too short
    assert ngram_propose([5], 3, 1, 4) == []
    assert ngram_propose([5, 5, 5], 0, 1, 4) == []


def test_ngram_proposer_reads_the_sequence() -> None:
    from llm_core.engine.speculative import NgramProposer

    seq = Sequence("r", [1, 2, 3, 4, 1, 2], max_tokens=8)
    proposer = NgramProposer(SpeculativeConfig.parse(ngram(3)))
    assert proposer.propose(seq, 3) == [3, 4, 1]
    seq.append_token(3)
    assert proposer.propose(seq, 2) == [4, 1]


@pytest.mark.parametrize(
    ("proposals", "draws", "emitted"),
    [
        ([4, 5, 6], [4, 5, 6, 7], [4, 5, 6, 7]),  # all accepted, plus the bonus draw
        ([4, 5, 6], [4, 9, 6, 7], [4, 9]),  # the first differing draw replaces its proposal
        ([4, 5, 6], [1, 5, 6, 7], [1]),
        ([4, 5, 6], [4, 5, 1, 7], [4, 5, 1]),
        ([], [3], [3]),
        ([4], [4, 4], [4, 4]),
    ],
)
def test_accept_draws(proposals: list[int], draws: list[int], emitted: list[int]) -> None:
    assert accept_draws(proposals, draws) == emitted


# ----------------------------------------------------------------------------------------------
# 10. acceptance statistics
# ----------------------------------------------------------------------------------------------


def test_spec_stats_record() -> None:
    stats = SpecStats(3)
    assert stats.acceptance_rate == 0.0 and stats.mean_acceptance_length == 0.0
    for proposed, accepted in [(3, 3), (3, 1), (2, 0), (1, 1)]:
        stats.record(proposed, accepted)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (4, 9, 5)
    assert stats.accepted_per_pos == [3, 1, 1]
    assert stats.acceptance_rate == pytest.approx(5 / 9)
    assert stats.mean_acceptance_length == pytest.approx(1 + 5 / 4)
    assert_stats_consistent(stats)
    assert MAX_SPECULATIVE_TOKENS == 32


def test_engine_stats_count_what_the_steps_emitted(
    target: tuple[pathlib.Path, PreTrainedModel], other_draft: pathlib.Path
) -> None:
    """One sequence: its tokens are the prefill's one, one per plain decode step, and per
    verification one plus the accepted proposals."""
    for spec in (ngram(4, lookup_max=2), draft(other_draft, k=3)):
        engine = make_llm(target[0], spec).llm_engine
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        engine.add_request("one", TINY_PROMPTS[1], params)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        stats = engine.spec_stats
        plain_decodes = steps - 1 - stats.num_drafts
        assert 1 + plain_decodes + stats.num_drafts + stats.num_accepted_tokens == 40
        assert stats.num_drafts > 0
        assert_stats_consistent(stats)
