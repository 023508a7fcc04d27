"""Rotary tables of every rope scaling variant against transformers' own rotary embeddings
(``ROPE_INIT_FUNCTIONS`` and ``dynamic_rope_update``), under generate()'s rule that a token at
position p of a sequence with a prompt of length L is rotated with the frequencies of
S = max(L, p + 1); and the engine's plumbing of ``CausalLM.rope_rows`` into
``ForwardBatch.rope_positions``."""

from __future__ import annotations

import math
import pathlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest_loaders import save_tiny_hf_checkpoint
from llm_core import LLM, SamplingParams
from llm_core.models.rope import (
    SUPPORTED_ROPE_TYPES,
    RopeTable,
    cos_sin_cache,
    inverse_frequencies,
    rope_parameters,
    rope_table,
)
from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config, PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

HEADS = 4


def llama(head_dim: int, max_pos: int, rope: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HEADS * head_dim,
        num_attention_heads=HEADS,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope),
    )


def phi3(head_dim: int, max_pos: int, original: int, rope: dict[str, Any], **kw: Any) -> Phi3Config:
    return Phi3Config(
        hidden_size=HEADS * head_dim,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=max_pos,
        original_max_position_embeddings=original,
        rope_parameters=dict(rope),
        **kw,
    )


def rotary_dim_of(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def hf_generate(rotary: torch.nn.Module, prompt_len: int, last: int, **kw: Any) -> np.ndarray:
    """cos | sin (half each) of positions [0, last] as generate() computes them: one forward
    over the prompt, then one per decoded position; (last + 1, R) float64."""
    x = torch.zeros(1, dtype=torch.float32)
    steps = [torch.arange(prompt_len)] + [torch.tensor([p]) for p in range(prompt_len, last + 1)]
    out = []
    with torch.no_grad():
        for pos in steps:
            cos, sin = rotary(x, pos[None], **kw)
            half = cos.shape[-1] // 2
            out.append(torch.cat([cos[0, :, :half], sin[0, :, half:]], dim=-1).double())
    return torch.cat(out).numpy()


def ours(config: Any, num_positions: int, prompt_len: int, last: int, **kw: Any) -> np.ndarray:
    params = rope_parameters(config, **kw)
    table = rope_table(rotary_dim_of(config), num_positions, params)
    positions = np.arange(last + 1, dtype=np.int64)
    rows = table.rows(positions, np.full(last + 1, prompt_len, dtype=np.int64))
    return table.table[rows].astype(np.float64)


def assert_close(got: np.ndarray, want: np.ndarray, last: int) -> None:
    """fp32 precision: transformers rounds the angle p * inv_freq to fp32 (and its inv_freq)."""
    assert got.shape == want.shape
    tol = 2e-6 + 4 * (last + 1) * 2.0**-24
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------
# variants that do not depend on the length
# ---------------------------------------------------------------------------------------------

FIXED: dict[str, tuple[Any, int]] = {
    "default": (llama(32, 64, {"rope_type": "default", "rope_theta": 10000.0}), 64),
    "default-theta": (llama(16, 64, {"rope_type": "default", "rope_theta": 500000.0}), 64),
    "default-partial": (
        phi3(32, 64, 64, {"rope_type": "default"}, partial_rotary_factor=0.5),
        64,
    ),
    "linear-2": (llama(32, 64, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), 64),
    "linear-4-partial": (
        llama(
            32,
            64,
            {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        ),
        64,
    ),
    "llama3": (
        llama(
            64,
            128,
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            },
        ),
        128,
    ),
    "llama3-other": (
        llama(
            32,
            128,
            {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 2.0,
                "high_freq_factor": 8.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
                "partial_rotary_factor": 0.5,
            },
        ),
        128,
    ),
}


def yarn(head_dim: int = 32, **extra: Any) -> LlamaConfig:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    rope |= {"rope_theta": 10000.0} | extra
    return llama(head_dim, 128, rope)


YARN = {
    "plain": yarn(),
    "partial": yarn(64, partial_rotary_factor=0.25),
    "mscale": yarn(mscale=0.707, mscale_all_dim=1.0),
    "mscale-equal": yarn(mscale=1.0, mscale_all_dim=1.0),  # DeepSeek-V3: attention factor 1
    "mscale-only": yarn(mscale=0.707),
    "attention-factor": yarn(attention_factor=0.8),
    "betas": yarn(beta_fast=16, beta_slow=2),
    "no-truncate": yarn(truncate=False),
    "factor-derived": yarn(factor=None),  # 128 / 32
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_variants_match_transformers(name: str) -> None:
    config, positions = FIXED[name]
    rotary_cls = Phi3RotaryEmbedding if isinstance(config, Phi3Config) else LlamaRotaryEmbedding
    want = hf_generate(rotary_cls(config), 5, positions - 1)
    assert_close(ours(config, positions, 5, positions - 1), want, positions - 1)


@pytest.mark.parametrize("name", sorted(YARN))
def test_yarn_matches_transformers(name: str) -> None:
    config = YARN[name]
    rotary = LlamaRotaryEmbedding(config)
    want = hf_generate(rotary, 40, 127)
    assert_close(ours(config, 128, 40, 127), want, 127)
    # The attention factor is in the table, and is transformers'.
    _, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    _, mine = inverse_frequencies(rotary_dim_of(config), rope_parameters(config))
    assert mine == pytest.approx(factor, rel=1e-12)
    if name == "mscale":
        assert factor != 1.0
    table = rope_table(rotary_dim_of(config), 4, rope_parameters(config)).table
    half = table.shape[1] // 2
    assert np.allclose(table[0, :half], factor)  # cos(0) * attention factor


# ---------------------------------------------------------------------------------------------
# dynamic NTK
# ---------------------------------------------------------------------------------------------

DYNAMIC = {
    "factor-2": llama(32, 32, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "factor-4-partial": llama(
        32,
        32,
        {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    ),
}


@pytest.mark.parametrize("name", sorted(DYNAMIC))
@pytest.mark.parametrize("prompt_len", [1, 9, 32])
def test_dynamic_ntk_matches_transformers_when_the_prompt_fits(name: str, prompt_len: int) -> None:
    """Decoding from below max_position_embeddings (32) to well past it (95)."""
    config = DYNAMIC[name]
    last = 95
    want = hf_generate(LlamaRotaryEmbedding(config), prompt_len, last)
    assert_close(ours(config, 96, prompt_len, last), want, last)


@pytest.mark.parametrize("name", sorted(DYNAMIC))
def test_dynamic_ntk_prompt_longer_than_max_position(name: str) -> None:
    """Documented difference: a prompt longer than max_position_embeddings is prefilled by
    transformers with inv_freq(L) for every token; our rows depend on the position alone, so
    the decoded tokens agree and the prompt tokens use inv_freq(max(p + 1, M))."""
    config = DYNAMIC[name]
    prompt_len, last = 48, 95
    want = hf_generate(LlamaRotaryEmbedding(config), prompt_len, last)
    got = ours(config, 96, prompt_len, last)
    assert_close(got[prompt_len:], want[prompt_len:], last)
    short_prompt = hf_generate(LlamaRotaryEmbedding(config), 1, last)
    assert_close(got[:prompt_len], short_prompt[:prompt_len], last)
    assert not np.allclose(got[:prompt_len], want[:prompt_len], atol=1e-4)


def test_dynamic_inverse_frequencies_equal_transformers() -> None:
    for config in DYNAMIC.values():
        params = rope_parameters(config)
        for seq_len in (None, 1, 32, 33, 100, 1000):
            want, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=seq_len)
            got, attention = inverse_frequencies(rotary_dim_of(config), params, seq_len)
            np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)
            assert attention == 1.0


def test_dynamic_switch_field_is_max_position_embeddings() -> None:
    """transformers 5.25 scales by config.max_position_embeddings (not the rope dict's
    original_max_position_embeddings); so does the table."""
    config = DYNAMIC["factor-2"]
    table = rope_table(32, 64, rope_parameters(config)).table
    default = rope_table(32, 64, {"rope_type": "default", "rope_theta": 10000.0}).table
    assert np.array_equal(table[:32], default[:32])
    assert not np.allclose(table[32:], default[32:], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# LongRoPE
# ---------------------------------------------------------------------------------------------


def longrope(head_dim: int = 32, partial: float = 1.0, **extra: Any) -> Phi3Config:
    rng = np.random.default_rng(head_dim + int(partial * 100))
    half = int(head_dim * partial) // 2
    rope = {
        "rope_type": "longrope",
        "short_factor": [float(x) for x in 1.0 + rng.random(half) * 0.2],
        "long_factor": [float(x) for x in 1.0 + rng.random(half) * 8.0],
    } | extra
    return phi3(head_dim, 128, 32, rope, partial_rotary_factor=partial)


LONGROPE = {
    "derived-attention": longrope(),  # sqrt(1 + log(128 / 32) / log(32))
    "partial": longrope(64, 0.5),
    "attention-factor": longrope(attention_factor=1.25),
    "explicit-factor": longrope(factor=8.0),
}


@pytest.mark.parametrize("name", sorted(LONGROPE))
@pytest.mark.parametrize("prompt_len", [1, 10, 32, 33, 60])
def test_longrope_matches_transformers_below_and_above_the_switch(
    name: str, prompt_len: int
) -> None:
    """Original length 32: prompts below it switch to long factors at the decode step of
    position 32 (S = 33); prompts above it use long factors for every token."""
    config = LONGROPE[name]
    last = 80
    want = hf_generate(Phi3RotaryEmbedding(config), prompt_len, last)
    assert_close(ours(config, 128, prompt_len, last), want, last)


def test_longrope_attention_factor_is_transformers() -> None:
    for name, config in LONGROPE.items():
        _, factor = ROPE_INIT_FUNCTIONS["longrope"](config)
        _, mine = inverse_frequencies(rotary_dim_of(config), rope_parameters(config))
        assert mine == pytest.approx(factor, rel=1e-12), name
    derived = math.sqrt(1 + math.log(128 / 32) / math.log(32))
    config = LONGROPE["derived-attention"]
    assert inverse_frequencies(32, rope_parameters(config))[1] == pytest.approx(derived)


def test_longrope_table_layout_and_rows() -> None:
    config = LONGROPE["derived-attention"]
    t = rope_table(32, 128, rope_parameters(config))
    assert t.table.shape == (256, 32) and t.table.dtype == np.float32
    assert (t.long_after, t.long_offset) == (32, 128)
    positions = np.array([0, 5, 31, 32, 40, 0, 5, 31, 32, 100], dtype=np.int64)
    prompts = np.array([6, 6, 6, 6, 6, 33, 33, 33, 33, 33], dtype=np.int64)
    # S = max(L, p + 1): 6 6 32 33 41 | 33 33 33 33 101
    expected = [0, 5, 31, 160, 168, 128, 133, 159, 160, 228]
    assert t.rows(positions, prompts).tolist() == expected
    assert t.rows(positions, prompts).dtype == np.int64


def test_rows_of_other_variants_are_the_positions() -> None:
    positions = np.arange(7, dtype=np.int64)
    for config, _ in FIXED.values():
        t = rope_table(rotary_dim_of(config), 16, rope_parameters(config))
        assert t.long_after is None and t.rows(positions, positions + 100) is positions
    t = rope_table(32, 64, rope_parameters(DYNAMIC["factor-2"]))
    assert t.rows(positions, positions + 100) is positions
    assert RopeTable(np.zeros((4, 2), np.float32)).rows(positions, positions) is positions


@pytest.mark.parametrize(
    "config",
    [c for c, _ in FIXED.values()] + [*YARN.values(), *DYNAMIC.values(), *LONGROPE.values()],
)
def test_inverse_frequencies_equal_rope_init_functions(config: Any) -> None:
    """Frequencies and attention factor against transformers' ROPE_INIT_FUNCTIONS (fp32, so
    to fp32 precision), at the initial length and past every switch."""
    kind = config.rope_parameters["rope_type"]
    params = rope_parameters(config)
    for seq_len in (None, 1, 32, 33, 100, 1000):
        if kind == "default":  # not in ROPE_INIT_FUNCTIONS: each model class has its own
            rotary = Phi3RotaryEmbedding if isinstance(config, Phi3Config) else LlamaRotaryEmbedding
            want, attention = rotary.compute_default_rope_parameters(config)
        else:
            want, attention = ROPE_INIT_FUNCTIONS[kind](config, seq_len=seq_len)
        got, mine = inverse_frequencies(rotary_dim_of(config), params, seq_len)
        np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)
        assert mine == pytest.approx(attention, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# config layouts
# ---------------------------------------------------------------------------------------------


def test_transformers_4x_layouts() -> None:
    v4 = SimpleNamespace(
        rope_theta=500000.0,
        rope_scaling={"type": "linear", "factor": 2.0},
        max_position_embeddings=64,
    )
    params = rope_parameters(v4)
    assert params["rope_type"] == "linear" and "type" not in params
    assert params["rope_theta"] == 500000.0 and params["partial_rotary_factor"] == 1.0
    v5 = llama(32, 64, {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    assert np.array_equal(
        rope_table(32, 64, params).table, rope_table(32, 64, rope_parameters(v5)).table
    )
    # "rope_type" spelling of 4.x, a config.json dict, and Phi-3's top-level original length.
    as_dict = {
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
        "max_position_embeddings": 128,
        "partial_rotary_factor": 0.5,
    }
    p = rope_parameters(as_dict)
    assert p["original_max_position_embeddings"] == 128 and p["partial_rotary_factor"] == 0.5
    phi = rope_parameters(LONGROPE["derived-attention"])
    assert phi["original_max_position_embeddings"] == 32 and phi["max_position_embeddings"] == 128
    # No rope fields at all: default rope, theta 10000.
    assert rope_parameters(SimpleNamespace())["rope_type"] == "default"
    assert rope_parameters(SimpleNamespace())["rope_theta"] == 10000.0


def gemma3(rope: dict[str, Any] | None = None, **kw: Any) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        num_hidden_layers=6,
        rope_parameters=rope,
        **kw,
    )


def test_gemma3_per_layer_type_parameters_match_transformers() -> None:
    config = gemma3(
        {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    )
    rotary = Gemma3RotaryEmbedding(config)
    for layer_type in ("full_attention", "sliding_attention"):
        want = hf_generate(rotary, 4, 63, layer_type=layer_type)
        params = rope_parameters(config, layer_type)
        t = rope_table(16, 64, params)
        assert_close(t.table.astype(np.float64), want, 63)
    assert rope_parameters(config, "full_attention")["factor"] == 8.0
    assert rope_parameters(config, "sliding_attention")["rope_theta"] == 1e4
    with pytest.raises(ValueError, match="layer_type"):
        rope_parameters(config)
    with pytest.raises(ValueError, match="chunked_attention"):
        rope_parameters(config, "chunked_attention")
    # transformers 4.x Gemma 3: rope_theta + rope_scaling for global layers, an unscaled
    # rope_local_base_freq for sliding ones.
    v4 = SimpleNamespace(
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    for layer_type in ("full_attention", "sliding_attention"):
        mine = rope_table(16, 64, rope_parameters(v4, layer_type)).table
        assert np.array_equal(mine, rope_table(16, 64, rope_parameters(config, layer_type)).table)
    # A flat layout serves every layer type.
    flat = llama(32, 64, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    assert rope_parameters(flat, "sliding_attention") == rope_parameters(flat)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings"),
        ({"rope_type": "dynamic", "max_position_embeddings": 8}, "factor"),
        ({"rope_type": "yarn", "factor": 2.0}, "original_max_position_embeddings"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 8}, "factor"),
        ({"rope_type": "longrope", "original_max_position_embeddings": 8}, "short_factor"),
        (
            {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
            "original_max_position_embeddings",
        ),
        (
            {
                "rope_type": "longrope",
                "short_factor": [1.0] * 4,
                "long_factor": [1.0] * 3,
                "original_max_position_embeddings": 8,
                "factor": 2.0,
            },
            "long_factor",
        ),
        (
            {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8},
            "low_freq_factor",
        ),
        ({"rope_type": "default", "rope_theta": None}, "rope_theta"),
    ],
)
def test_missing_fields_are_named(params: dict[str, Any], field: str) -> None:
    params = {"rope_theta": 10000.0} | params
    with pytest.raises(ValueError, match=field) as info:
        rope_table(8, 16, params)
    if "must list" not in str(info.value):
        assert "longrope" in str(info.value)  # the supported types are listed


def test_unknown_type_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="'mrope-x'") as info:
        rope_table(8, 16, {"rope_type": "mrope-x", "rope_theta": 1e4})
    assert all(kind in str(info.value) for kind in SUPPORTED_ROPE_TYPES)
    with pytest.raises(ValueError, match="even"):
        rope_table(7, 16, {"rope_theta": 1e4})


def test_cos_sin_cache_keeps_its_signature() -> None:
    table = cos_sin_cache(16, 32, 10000.0)
    assert table.shape == (32, 16) and table.dtype == np.float32
    want = rope_table(16, 32, {"rope_type": "default", "rope_theta": 10000.0}).table
    assert np.array_equal(table, want)


# ---------------------------------------------------------------------------------------------
# engine plumbing
# ---------------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 99, 23, 181, 7, 64], [250, 3, 14, 15, 92, 65, 35, 89, 79, 32], [42]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, PreTrainedModel]:
    path = tmp_path_factory.mktemp("llama-rope")
    return path, save_tiny_hf_checkpoint(path, "llama")


def make_llm(path: pathlib.Path, **kwargs: Any) -> LLM:
    kwargs.setdefault("kv_cache_memory", "4MiB")
    return LLM(str(path), dtype="float32", load_progress=False, **kwargs)


def tokens(outputs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def record_batches(llm: LLM) -> list[tuple[bool, list[int], list[int]]]:
    """(rope_positions is positions, positions, rope_positions) of every forward call."""
    engine = llm.llm_engine
    model, be = engine.runner.model, engine.backend
    seen: list[tuple[bool, list[int], list[int]]] = []
    forward = model.forward

    def spy(batch: Any, kv_caches: Any) -> Any:
        seen.append(
            (
                batch.rope_positions is batch.positions,
                be.to_host(batch.positions).tolist(),
                be.to_host(batch.rope_positions).tolist(),
            )
        )
        return forward(batch, kv_caches)

    model.forward = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("eager", [False, True])
def test_runner_fills_rope_positions_with_the_positions_for_llama(
    tiny_llama: tuple[pathlib.Path, PreTrainedModel], eager: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if eager:
        monkeypatch.setenv("LLM_CORE_ENFORCE_EAGER", "1")
    llm = make_llm(tiny_llama[0])
    seen = record_batches(llm)
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert seen
    for same, positions, rows in seen:
        assert same and rows == positions  # the positions tensor itself: no second upload


def logprobs(outputs: list) -> np.ndarray:
    """The sampled tokens' log-probabilities (the tiny model's greedy tokens hardly depend
    on the rotary rows; their probabilities do)."""
    return np.array(
        [[next(iter(x.values())).logprob for x in o.outputs[0].logprobs] for o in outputs]
    )


def test_rope_rows_reach_the_model_in_recorded_and_eager_steps(
    tiny_llama: tuple[pathlib.Path, PreTrainedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose rows are not its positions: its rows are what the rotary reads (outputs
    change), the same in recorded decode graphs and eager steps, including a graph recorded
    while the rows were still the positions; rope_rows sees each sequence's length."""
    path = tiny_llama[0]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    baseline = logprobs(make_llm(path).generate(PROMPTS, params, use_tqdm=False))
    lengths = {len(p) for p in PROMPTS}

    def run(rows_fn: Any, eager: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        with monkeypatch.context() as m:
            if eager:
                m.setenv("LLM_CORE_ENFORCE_EAGER", "1")
            llm = make_llm(path)
            seen_lens: list[np.ndarray] = []

            def rope_rows(positions: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
                seen_lens.append(np.where(seq_lens > positions + 1, seq_lens, 0))
                return rows_fn(positions)

            llm.llm_engine.runner.model.rope_rows = rope_rows  # type: ignore[method-assign]
            return logprobs(llm.generate(PROMPTS, params, use_tqdm=False)), seen_lens

    stretched = lambda p: p * 2  # noqa: E731 (rotary is relative: a shift would not show)
    late = lambda p: p * 2 if p.max() >= 12 else p  # noqa: E731 (identity, then not)
    for fn in (stretched, late):
        recorded, lens = run(fn, eager=False)
        eager, eager_lens = run(fn, eager=True)
        np.testing.assert_allclose(recorded, eager, rtol=0, atol=1e-5)
        assert np.abs(recorded - baseline).max() > 1e-4
        # A length beyond the token's own position is a prompt's (decode rows give p + 1,
        # marked 0 above; so do the padding rows of a decode graph).
        for seen in lens + eager_lens:
            assert set(seen.tolist()) <= lengths | {0}
        assert any(set(s.tolist()) - {0} == lengths - {1} for s in eager_lens)
    same, _ = run(lambda p: p.copy(), eager=False)  # a copy: uploaded, same values
    np.testing.assert_allclose(same, baseline, rtol=0, atol=1e-6)


def test_rope_rows_get_each_sequence_length_also_when_recomputed(
    tiny_llama: tuple[pathlib.Path, PreTrainedModel],
) -> None:
    """With a tiny cache sequences are preempted and recomputed (prefill of prompt plus the
    tokens generated so far): rope_rows gets, for every token, the number of tokens its
    sequence holds at that step (the prompt's length in a prefill, the recomputed length in a
    recompute, p + 1 in a decode)."""
    path = tiny_llama[0]
    prompts = [[(7 * i + j) % 290 + 3 for j in range(20 + i)] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm = make_llm(path, kv_cache_memory=8 * 16 * 2 * 2 * 2 * 16 * 4, max_num_batched_tokens=7)
    engine = llm.llm_engine
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def rope_rows(positions: np.ndarray, prompt_lens: np.ndarray) -> np.ndarray:
        seen.append((positions.copy(), prompt_lens.copy()))
        return positions

    engine.runner.model.rope_rows = rope_rows  # type: ignore[method-assign]
    steps: list[list[tuple[int, int, int, int]]] = []  # (length, start, end, prompt length)
    original = engine.scheduler.schedule

    def schedule() -> Any:
        out = original()
        if not out.is_empty:
            steps.append(
                [(i.seq.num_tokens, i.start, i.end, i.seq.num_prompt_tokens) for i in out.scheduled]
            )
        return out

    engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    llm.generate(prompts, params, use_tqdm=False)
    seen = [s for s in seen if s[1].max() > 1]  # not a new decode graph's probe of padding
    assert len(steps) == len(seen)
    recomputed = 0
    for items, (positions, prompt_lens) in zip(steps, seen):
        want_pos = np.concatenate([np.arange(a, b) for _, a, b, _ in items])
        want_lens = np.concatenate([np.full(b - a, n) for n, a, b, _ in items])
        assert positions[: len(want_pos)].tolist() == want_pos.tolist()
        assert prompt_lens[: len(want_lens)].tolist() == want_lens.tolist()
        recomputed += sum(b - a > 1 and n > prompt for n, a, b, prompt in items)
    assert recomputed, "the small cache should have forced a recompute past the prompt"
