"""Every dense family and rope variant against transformers fp32, greedy, 64 tokens, token for
token, on every backend that runs here; and the config checks that refuse what a family does not
implement, by name.

The checkpoints are tiny random-weight models built from transformers' own config classes, with
windows and soft-caps small enough that the prompts (up to 40 tokens, 16-token KV blocks) cross
the sliding windows, several KV blocks and the rope scaling switch lengths.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch
from conftest_loaders import save_tiny_hf_checkpoint
from llm_core import LLM, SamplingParams
from llm_hal import get_registry
from transformers import AutoModelForCausalLM, PreTrainedModel

MAX_NEW = 64
PROMPTS = [
    [5, 17, 99, 23, 181, 7, 64],
    [250, 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71],
    list(range(11, 51)),  # 40 tokens: past every window and switch length below
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _llama_rope(params: dict[str, Any]) -> dict[str, Any]:
    return {"rope_parameters": {"rope_theta": 10000.0, **params}}


#: name -> (architecture key for the tiny checkpoint, config overrides). The families' own tiny
#: configs (conformance's TINY_ARCHITECTURES) already set windows, caps and partial rotary.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3_text", {}),
    "phi3": ("phi3", {}),
    "glm4": ("glm4", {}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": 10}),
    "qwen2-window-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 9, "max_window_layers": 1},
    ),
    "qwen3-biases": ("qwen3", {"attention_bias": True}),
    "rope-linear": ("llama", _llama_rope({"rope_type": "linear", "factor": 2.0})),
    "rope-dynamic": (
        "llama",
        {
            "max_position_embeddings": 32,
            **_llama_rope({"rope_type": "dynamic", "factor": 4.0}),
        },
    ),
    "rope-llama3": (
        "llama",
        _llama_rope(
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "rope-yarn": (
        "qwen2",
        _llama_rope(
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        ),
    ),
    "rope-longrope": (
        "phi3",
        {
            "original_max_position_embeddings": 32,
            "max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0 + 0.1 * i for i in range(6)],
                "long_factor": [2.0 + 0.5 * i for i in range(6)],
                "original_max_position_embeddings": 32,
            },
        },
    ),
}


def _edit_config(path: pathlib.Path, overrides: dict[str, Any]) -> None:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.update(overrides)
    config_file.write_text(json.dumps(config))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, pathlib.Path, PreTrainedModel]:
    arch, overrides = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    save_tiny_hf_checkpoint(path, arch, logit_scale=25.0, overrides=overrides)
    # The reference is loaded back from the files, so it sees exactly the config we serve.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, model


def _require(backend: str) -> None:
    record = get_registry().records.get(backend)
    if record is None:
        pytest.skip(f"backend {backend} is not installed")
    availability = record.availability()
    if not availability.available:
        pytest.skip(f"backend {backend} unavailable: {availability.reason}")


def hf_greedy(model: PreTrainedModel, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=-1,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("backend", ["cpu", "opencl"])
def test_greedy_64_tokens_match_transformers(
    variant: tuple[str, pathlib.Path, PreTrainedModel], backend: str
) -> None:
    name, path, model = variant
    _require(backend)
    llm = LLM(
        str(path),
        dtype="float32",
        backend=backend,
        kv_cache_memory="8MiB",
        block_size=16,
        load_progress=False,
    )
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    theirs = [hf_greedy(model, p) for p in PROMPTS]
    for prompt, a, b in zip(PROMPTS, ours, theirs, strict=True):
        assert a == b, f"{name} on {backend}: prompt of {len(prompt)} tokens diverges"


# --- refusals ---------------------------------------------------------------------------------


def _checkpoint(tmp_path: pathlib.Path, arch: str, overrides: dict[str, Any]) -> pathlib.Path:
    save_tiny_hf_checkpoint(tmp_path, arch)
    _edit_config(tmp_path, overrides)
    return tmp_path


@pytest.mark.parametrize(
    ("arch", "overrides", "named"),
    [
        ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma3_text", {"attn_logit_softcapping": 30.0}, "attn_logit_softcapping"),
        ("llama", {"hidden_act": "relu2"}, "hidden_act"),
        ("gemma2", {"layer_types": ["full_attention"]}, "layer_types"),
        ("llama", {"rope_parameters": {"rope_type": "su-perfect", "rope_theta": 1.0}}, "rope"),
    ],
)
def test_unsupported_config_field_is_refused_by_name(
    tmp_path: pathlib.Path, arch: str, overrides: dict[str, Any], named: str
) -> None:
    path = _checkpoint(tmp_path, arch, overrides)
    with pytest.raises(Exception, match=named):
        LLM(str(path), dtype="float32", kv_cache_memory="4MiB", load_progress=False)


def test_bias_without_config_flag_names_the_bias(tmp_path: pathlib.Path) -> None:
    """A checkpoint with attention biases whose config says attention_bias=false was reported
    as lacking v_proj.weight; now the message names the bias and the config field."""
    save_tiny_hf_checkpoint(tmp_path, "llama", overrides={"attention_bias": True})
    _edit_config(tmp_path, {"attention_bias": False})
    with pytest.raises(Exception, match=r"bias.*attention_bias"):
        LLM(str(tmp_path), dtype="float32", kv_cache_memory="4MiB", load_progress=False)


@pytest.mark.parametrize("variant", ["rope-longrope"], indirect=True)
def test_longrope_switch_is_exact_with_prefix_caching_and_preemption(
    variant: tuple[str, pathlib.Path, PreTrainedModel],
) -> None:
    """Sequences sharing a prefix, on both sides of the LongRoPE switch, in one batch with the
    prefix cache on and a cache small enough to preempt: each gets what transformers gives it
    alone (which recomputes a sequence growing past the switch)."""
    _, path, model = variant
    shared = PROMPTS[1][:20]
    prompts = [[*shared, 7], [*shared, 9, 11], shared + list(range(40, 55)), PROMPTS[2]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [hf_greedy(model, p)[:24] for p in prompts]
    llm = LLM(
        str(path),
        dtype="float32",
        kv_cache_memory=4 * 16 * 2 * 2 * 2 * 16 * 4 * 3,  # ~3 sequences' worth of blocks
        block_size=16,
        max_num_batched_tokens=24,
        enable_prefix_caching=True,
        load_progress=False,
    )
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert together == alone


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_refuses_float16_with_the_reason(tmp_path: pathlib.Path, arch: str) -> None:
    """Gemma's activations overflow fp16 (transformers' own fp16 forward of Gemma 3 270M gives
    NaN logits): refused at load, saying which dtypes to use, never NaN tokens."""
    save_tiny_hf_checkpoint(tmp_path, arch)
    with pytest.raises(ValueError, match=r"float16.*bfloat16"):
        LLM(str(tmp_path), dtype="float16", kv_cache_memory="4MiB", load_progress=False)
