"""The engine end to end on tiny random-weight checkpoints of every family, against
Hugging Face transformers, and its batching invariants (alone vs mixed batch, prefix cache,
chunked prefill, preemption), sampling and stop conditions."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from conftest_loaders import TINY_ARCHITECTURES, save_tiny_hf_checkpoint
from llm_core import LLM, SamplingParams
from llm_core.engine.llm_engine import RequestError
from transformers import PreTrainedModel

PROMPTS = [
    [5, 17, 99, 23, 181, 7, 64],
    [250, 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71],
    [42],
    [
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        18,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        29,
        30,
        31,
        32,
        33,
        34,
        35,
        36,
        37,
        38,
        39,
        40,
        41,
        42,
        43,
        44,
        45,
    ],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(TINY_ARCHITECTURES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param)
    model = save_tiny_hf_checkpoint(path, request.param)
    return path, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, PreTrainedModel]:
    path = tmp_path_factory.mktemp("llama")
    return path, save_tiny_hf_checkpoint(path, "llama")


def make_llm(path: pathlib.Path, **kwargs: object) -> LLM:
    kwargs.setdefault("kv_cache_memory", "4MiB")
    return LLM(str(path), dtype="float32", load_progress=False, **kwargs)  # type: ignore[arg-type]


def hf_greedy(model: PreTrainedModel, prompt: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=-1,  # no EOS: compare all max_new tokens (min_new_tokens would ban EOS)
        )
    return out[0, len(prompt) :].tolist()


def tokens(outputs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_transformers(tiny: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path, model = tiny
    llm = make_llm(path)
    ours = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    theirs = [hf_greedy(model, p, GREEDY.max_tokens or 0) for p in PROMPTS]
    assert ours == theirs


def test_logprobs_match_transformers(llama: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path, model = llama
    llm = make_llm(path)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    with torch.no_grad():
        full = torch.tensor([PROMPTS[0] + out.token_ids])
        ref = torch.log_softmax(model(full).logits[0].double(), dim=-1)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(PROMPTS[0]) - 1 + i]
        assert entry[tok].rank == 1  # greedy picks the most likely token
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        top = row.topk(3)
        assert sorted(entry) == sorted(set(top.indices.tolist()) | {tok})
        assert out.cumulative_logprob is not None
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))
    )


def test_prompt_logprobs_match_transformers(
    llama: tuple[pathlib.Path, PreTrainedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every prompt token's log-probability (and the top 2) equal transformers' log-softmax,
    with the prompt split over 7-token chunks, computed 4 rows at a time, its blocks already
    in the prefix cache (a request asking for prompt logprobs computes every position anyway)
    and n=2; the generated tokens are those of a request that asked for none."""
    from llm_core.engine import model_runner

    monkeypatch.setattr(model_runner, "PROMPT_LOGPROB_ROWS", 4)
    path, model = llama
    prompt = PROMPTS[3]
    llm = make_llm(path, max_num_batched_tokens=7, block_size=4)
    plain = llm.generate([prompt], GREEDY, use_tqdm=False)[0]  # fills the prefix cache
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=2, n=2)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), dim=-1)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry is not None
        row, tok = ref[i - 1], prompt[i]
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        assert sorted(entry) == sorted(set(row.topk(2).indices.tolist()) | {tok})
        assert all(e.decoded_token is not None for e in entry.values())
    assert [o.token_ids for o in out.outputs] == [plain.outputs[0].token_ids] * 2
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].prompt_logprobs is None


def test_alone_equals_mixed_batch(llama: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path, _ = llama
    llm = make_llm(path)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = [tokens(llm.generate([p], [GREEDY], use_tqdm=False))[0] for p in PROMPTS]
    alone_seeded = [tokens(llm.generate([p], [seeded], use_tqdm=False))[0] for p in PROMPTS]
    mixed = tokens(llm.generate(PROMPTS + PROMPTS, [GREEDY] * 4 + [seeded] * 4, use_tqdm=False))
    assert mixed[:4] == alone
    assert mixed[4:] == alone_seeded


def test_prefix_cache_on_off_and_chunked_whole_prefill_agree(
    llama: tuple[pathlib.Path, PreTrainedModel],
) -> None:
    path, _ = llama
    shared = PROMPTS[3]
    prompts = [[*shared, 7, 8, 9], [*shared, 100, 101], shared]
    reference = tokens(
        make_llm(path, enable_prefix_caching=False).generate(prompts, GREEDY, use_tqdm=False)
    )

    cached = make_llm(path, enable_prefix_caching=True)
    first = cached.generate([prompts[0]], GREEDY, use_tqdm=False)
    rest = cached.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert tokens(first + rest) == reference
    assert all(o.num_cached_tokens >= 32 for o in rest)  # two full 16-token blocks reused

    chunked = make_llm(path, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert tokens(chunked.generate(prompts, GREEDY, use_tqdm=False)) == reference


@pytest.mark.parametrize("budget", [2048, 7])
def test_preemption_and_recompute_keep_outputs(
    llama: tuple[pathlib.Path, PreTrainedModel], budget: int
) -> None:
    """With a 7-token step budget the prompts are prefilled in chunks, and sequences are
    preempted in the middle of their prompts too."""
    path, _ = llama
    prompts = [[(7 * i + j) % 290 + 3 for j in range(20 + i)] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    whole = make_llm(path).generate(prompts, params, use_tqdm=False)
    reference = tokens(whole)
    # 8 blocks of 16 tokens: far less than 8 sequences of ~70 tokens need at once.
    small = make_llm(
        path, kv_cache_memory=8 * 16 * 2 * 2 * 2 * 16 * 4, max_num_batched_tokens=budget
    )  # blocks, tokens, k+v, layers, heads, D, fp32
    engine = small.llm_engine
    assert engine.block_manager.num_blocks == 8
    preempted = []
    original = engine.scheduler.schedule

    def schedule():  # observe the scheduler's decisions without changing them
        out = original()
        preempted.extend(out.preempted)
        return out

    engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    outputs = small.generate(prompts, params, use_tqdm=False)
    assert tokens(outputs) == reference
    assert preempted, "the small cache should have forced preemption"
    # A recomputed prefill reports no prompt position twice.
    for got, want in zip(outputs, whole):
        assert got.prompt_logprobs is not None and want.prompt_logprobs is not None
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(got.prompt_token_ids)
        for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
            assert g is not None and w is not None and g.keys() == w.keys()
            assert all(g[t].logprob == pytest.approx(w[t].logprob, abs=1e-5) for t in g)
    assert engine.block_manager.num_available_blocks == 8  # nothing leaked


def test_seeded_sampling_is_reproducible(llama: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path, _ = llama
    llm = make_llm(path)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True, n=3)
    a = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    b = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3  # n completions differ
    other = llm.generate(
        [PROMPTS[0]],
        SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True),
        use_tqdm=False,
    )
    assert other[0].outputs[0].token_ids != a.outputs[0].token_ids


def test_sampling_distribution_matches_exact_probabilities(
    llama: tuple[pathlib.Path, PreTrainedModel],
) -> None:
    """First-token draws over many seeds against softmax(logits / T) restricted to the top 3."""
    path, model = llama
    llm = make_llm(path, max_num_seqs=512)
    prompt = PROMPTS[1]
    temperature, k, draws = 1.5, 3, 1200
    params = [
        SamplingParams(temperature=temperature, top_k=k, seed=s, max_tokens=1) for s in range(draws)
    ]
    drawn = [
        o.outputs[0].token_ids[0] for o in llm.generate([prompt] * draws, params, use_tqdm=False)
    ]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double() / temperature
    top = logits.topk(k)
    exact = torch.softmax(top.values, dim=-1).numpy()
    ids = top.indices.tolist()
    assert set(drawn) <= set(ids)
    observed = np.array([drawn.count(i) for i in ids])
    expected = exact * draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, f"chi-square {chi2:.1f} over 2 degrees of freedom (p < 0.001)"


def test_stop_tokens_and_strings_end_output_exactly(
    llama: tuple[pathlib.Path, PreTrainedModel],
) -> None:
    path, _ = llama
    llm = make_llm(path)
    base = llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0].outputs[0]
    ids = base.token_ids
    stop_id = ids[5]
    first = ids.index(stop_id)
    out = llm.generate(
        [PROMPTS[1]],
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0]
    c = out.outputs[0]
    assert c.token_ids == ids[: first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id

    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(
        [PROMPTS[1]],
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0]
    c = out.outputs[0]
    assert c.text == text[: text.index(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop

    out = llm.generate(
        [PROMPTS[1]],
        SamplingParams(
            temperature=0,
            max_tokens=12,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].text == text[: text.index(stop) + len(stop)]

    out = llm.generate(
        [PROMPTS[1]],
        SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[ids[0]], min_tokens=4
        ),
        use_tqdm=False,
    )[0]
    assert len(out.outputs[0].token_ids) >= 4
    assert ids[0] not in out.outputs[0].token_ids[:3]  # banned before min_tokens


def test_eos_ends_generation(llama: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path, _ = llama
    llm = make_llm(path)
    base = llm.generate([PROMPTS[2]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.llm_engine
    engine.eos_token_ids = {base[3]}  # pretend the 4th greedy token is this model's EOS
    c = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[
        0
    ].outputs[0]
    assert c.token_ids == base[: base.index(base[3]) + 1]
    assert c.finish_reason == "stop" and c.stop_reason is None
    c = llm.generate([PROMPTS[2]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert c.token_ids == base and c.finish_reason == "length"


def test_bad_request_is_refused_and_others_are_served(
    llama: tuple[pathlib.Path, PreTrainedModel],
) -> None:
    path, _ = llama
    llm = make_llm(path, max_model_len=64)
    engine = llm.llm_engine
    engine.add_request("good", PROMPTS[0], GREEDY)
    with pytest.raises(RequestError, match="max_model_len"):
        engine.add_request("long", list(range(3, 80)), GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("oov", [1, 2, 100000], GREEDY)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert len(finished[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_generation_is_capped_by_max_model_len(llama: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path, _ = llama
    llm = make_llm(path, max_model_len=40)
    out = llm.generate(
        [PROMPTS[3]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert len(PROMPTS[3]) + len(out.token_ids) == 40
    assert out.finish_reason == "length"


def test_abort_frees_blocks_at_once(llama: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path, _ = llama
    llm = make_llm(path)
    engine = llm.llm_engine
    total = engine.block_manager.num_available_blocks
    engine.add_request("a", PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_available_blocks < total
    engine.abort_request("a")
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_available_blocks == total


def test_text_prompts_and_chat(llama: tuple[pathlib.Path, PreTrainedModel]) -> None:
    path, _ = llama
    llm = make_llm(path)
    tok = llm.get_tokenizer()
    text_out = llm.generate("Hello world", GREEDY, use_tqdm=False)[0]
    assert text_out.prompt == "Hello world"
    assert text_out.prompt_token_ids == tok.encode("Hello world")
    assert text_out.outputs[0].text == tok.decode(
        text_out.outputs[0].token_ids, skip_special_tokens=True
    )
    chat = llm.chat([{"role": "user", "content": "Hello"}], GREEDY, use_tqdm=False)[0]
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.prompt == expected
    assert chat.prompt_token_ids == tok.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decode_steps_agree_recorded_or_eager(
    llama: tuple[pathlib.Path, PreTrainedModel], dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: decode steps reuse one metadata object, and a backend's cached device copies
    of it went stale (fp16, where the CPU backend runs torch code, diverged from eager)."""
    path, _ = llama
    kwargs = {"dtype": dtype, "load_progress": False, "kv_cache_memory": "4MiB"}
    recorded = tokens(LLM(str(path), **kwargs).generate(PROMPTS, GREEDY, use_tqdm=False))
    monkeypatch.setenv("LLM_CORE_ENFORCE_EAGER", "1")
    eager = tokens(LLM(str(path), **kwargs).generate(PROMPTS, GREEDY, use_tqdm=False))
    assert recorded == eager
