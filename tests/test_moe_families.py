"""Mixtral, Qwen2-MoE and Qwen3-MoE against transformers fp32, greedy, 64 tokens, token for token
on cpu (the HAL's moe_route / moe_experts, by the reference implementation); the refusals of
inconsistent expert settings, by field name; and what a backend without the MoE operators does
(OpenCL today): it refuses the model at load, naming the operator, unless fallback is on.

The tiny checkpoints (conformance's TINY_ARCHITECTURES) route sharply and have loud experts
(``MOE_ROUTER_SCALE``, ``MOE_EXPERT_SCALE``), and the prompts' log-probabilities must equal
transformers' to 1e-4 as well as the tokens: a lost renormalization, top-1 instead of top-2 or a
dropped shared-expert gate moves them by 0.1 to 5, where fp32 rounding stays under 1e-5.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch
from conftest_loaders import build_tiny_tokenizer, save_tiny_hf_checkpoint, tiny_model
from llm_core import LLM, SamplingParams
from llm_hal import UnsupportedOpError, get_registry
from transformers import AutoModelForCausalLM, PreTrainedModel

MAX_NEW = 64
PROMPTS = [
    [5, 17, 99, 23, 181, 7, 64],
    [250, 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71],
    list(range(11, 51)),  # 40 tokens: past the window below and over several KV blocks
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
PROMPT_LOGPROBS = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)

#: name -> (model type of the tiny checkpoint, config overrides, save in transformers 5's fused
#: layout). The tiny configs: Mixtral 8 experts top-2; Qwen2-MoE 8 experts top-2, raw top-k
#: weights and a shared expert; Qwen3-MoE 8 experts top-2, renormalized, layer 1 dense.
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "mixtral": ("mixtral", {}, False),
    "mixtral-window": ("mixtral", {"sliding_window": 10}, False),
    "mixtral-fused": ("mixtral", {}, True),
    "qwen2-moe-shared-expert": ("qwen2_moe", {}, False),
    "qwen2-moe-norm-topk-sparse-step": (
        "qwen2_moe",
        {"norm_topk_prob": True, "decoder_sparse_step": 2},
        False,
    ),
    "qwen2-moe-fused": ("qwen2_moe", {}, True),
    "qwen3-moe-dense-layer": ("qwen3_moe", {}, False),
    "qwen3-moe-raw-topk-biases": (
        "qwen3_moe",
        {"norm_topk_prob": False, "mlp_only_layers": [], "attention_bias": True},
        False,
    ),
}


def _save(path: pathlib.Path, arch: str, overrides: dict[str, Any], fused: bool) -> None:
    if not fused:
        save_tiny_hf_checkpoint(path, arch, logit_scale=25.0, overrides=overrides)
        return
    # What save_pretrained(save_original_format=False) writes: mlp.gate.weight,
    # mlp.experts.gate_up_proj (E, 2I, H) and mlp.experts.down_proj (E, H, I).
    model = tiny_model(arch, logit_scale=25.0, overrides=overrides)
    model.save_pretrained(path, save_original_format=False)
    build_tiny_tokenizer().save_pretrained(path)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, pathlib.Path, PreTrainedModel]:
    arch, overrides, fused = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    _save(path, arch, overrides, fused)
    # The reference is loaded back from the files, so it sees exactly the config we serve.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, model


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


def _llm(path: pathlib.Path, backend: str = "cpu", **kwargs: Any) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        backend=backend,
        kv_cache_memory="8MiB",
        block_size=16,
        load_progress=False,
        **kwargs,
    )


def test_greedy_64_tokens_match_transformers_on_cpu(
    variant: tuple[str, pathlib.Path, PreTrainedModel],
) -> None:
    name, path, model = variant
    llm = _llm(path)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    theirs = [hf_greedy(model, p) for p in PROMPTS]
    for prompt, a, b in zip(PROMPTS, ours, theirs, strict=True):
        assert a == b, f"{name}: prompt of {len(prompt)} tokens diverges"
    prompt = PROMPTS[-1]
    (out,) = llm.generate([prompt], PROMPT_LOGPROBS, use_tqdm=False)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), dim=-1)
    assert out.prompt_logprobs is not None
    for i, entry in enumerate(out.prompt_logprobs[1:]):  # the first token has none
        for token, got in entry.items():
            assert got.logprob == pytest.approx(want[i, token].item(), abs=1e-4), (name, i)


# --- refusals ---------------------------------------------------------------------------------


def _edit_config(path: pathlib.Path, overrides: dict[str, Any]) -> None:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.update(overrides)
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("arch", "overrides", "message"),
    [
        (
            "mixtral",
            {"num_experts_per_tok": 9},
            r"num_experts_per_tok=9 is more than config\.num_local_experts=8",
        ),
        ("qwen3_moe", {"num_experts_per_tok": 0}, r"num_experts_per_tok=0"),
        ("qwen2_moe", {"decoder_sparse_step": 0}, r"decoder_sparse_step=0"),
        ("qwen3_moe", {"mlp_only_layers": [1, 7]}, r"mlp_only_layers lists layers \[7\]"),
        ("qwen2_moe", {"shared_expert_intermediate_size": 0}, r"shared_expert_intermediate_size"),
        ("qwen2_moe", {"hidden_act": "gelu_pytorch_tanh"}, r"hidden_act='gelu_pytorch_tanh'"),
        # The experts' tensors say 32: the config must not say otherwise.
        (
            "qwen2_moe",
            {"moe_intermediate_size": 16},
            r"experts\.0\.\w+\.weight has the shape \((64, 32|32, 64)\), but its config gives",
        ),
    ],
)
def test_inconsistent_expert_settings_are_refused_by_name(
    tmp_path: pathlib.Path, arch: str, overrides: dict[str, Any], message: str
) -> None:
    save_tiny_hf_checkpoint(tmp_path, arch)
    _edit_config(tmp_path, overrides)
    with pytest.raises(ValueError, match=message):
        _llm(tmp_path)


# --- a backend without the MoE operators ------------------------------------------------------


def _require(backend: str) -> None:
    record = get_registry().records.get(backend)
    if record is None:
        pytest.skip(f"backend {backend} is not installed")
    availability = record.availability()
    if not availability.available:
        pytest.skip(f"backend {backend} unavailable: {availability.reason}")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_opencl_refuses_a_mixture_of_experts_at_load_naming_the_operator(
    tmp_path: pathlib.Path, arch: str
) -> None:
    """OpenCL has no moe_route / moe_experts kernels yet: the model is refused when it loads
    (not at its first request), with the operator named; the conformance cell is UNSUPPORTED."""
    _require("opencl")
    save_tiny_hf_checkpoint(tmp_path, arch)
    with pytest.raises(UnsupportedOpError, match="does not support operator moe_route") as info:
        _llm(tmp_path, backend="opencl")
    assert info.value.backend == "opencl" and info.value.op == "moe_route"
    assert "mixture-of-experts layers need it" in str(info.value)


def test_opencl_with_fallback_serves_the_experts_on_cpu(tmp_path: pathlib.Path) -> None:
    """With fallback on (named and counted), the experts run on cpu and the rest on opencl."""
    _require("opencl")
    save_tiny_hf_checkpoint(tmp_path, "qwen2_moe", logit_scale=25.0)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = _llm(tmp_path, backend="opencl", fallback_backend="cpu")
    prompt = PROMPTS[0]
    (out,) = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(reference, prompt)
    counts = llm.llm_engine.backend.counts
    assert counts["moe_route"] > 0 and counts["moe_experts"] > 0
