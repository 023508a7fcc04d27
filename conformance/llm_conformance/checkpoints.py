"""Tiny random-weight checkpoints, saved exactly like real ones, for the suite and the tests.

Everything here is built offline in about a second: a byte-level BPE tokenizer trained on a
few sentences, transformers models with 64 hidden units and 2 layers saved as safetensors, and
GGUF files written with the ``gguf`` package the way llama.cpp's converter writes them (names,
reversed shapes, llama's q/k row permutation, optional quantization).

The conformance suite builds one checkpoint per architecture the engine supports, with a
``logit_scale`` that makes the next-token distributions as peaked as a trained model's (a
random model's are nearly uniform, and KL divergence on a uniform distribution says little).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    Glm4Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Hello world, how are you today?",
    "Large language models predict the next token.",
    "One engine, many accelerators, the same answers.",
]
TINY_VOCAB = 300  # 256 byte symbols, 3 special tokens, 41 merges

# Hugging Face config class and extra fields per architecture, all with 64 hidden units and
# 2 layers; head sizes differ so GQA and an explicit head_dim are covered.
TINY_ARCHITECTURES: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (LlamaConfig, {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral": (MistralConfig, {"num_attention_heads": 4, "num_key_value_heads": 1}),
    "qwen2": (Qwen2Config, {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen3": (Qwen3Config, {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}),
    # Windows of 8-12 tokens and small soft-caps, so the prompts cross windows and the caps bite;
    # the query scale differs from head_dim**-0.5; Gemma 3's global layer has linear scaling.
    "gemma2": (
        Gemma2Config,
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 10.0,
        },
    ),
    "gemma3_text": (
        Gemma3TextConfig,
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "query_pre_attn_scalar": 48,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
        },
    ),
    "phi3": (
        Phi3Config,
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "sliding_window": 12,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
            },
        },
    ),
    "glm4": (Glm4Config, {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}),
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``TINY_VOCAB`` tokens with a ChatML chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    arch: str, *, tie_word_embeddings: bool = False, overrides: dict[str, Any] | None = None
) -> PretrainedConfig:
    """The config of a tiny model: ``arch`` is a key of ``TINY_ARCHITECTURES`` or any Hugging
    Face model type (``"llama"``) or causal-LM class name (``"LlamaForCausalLM"``);
    ``overrides`` replace or add config fields (``attention_bias=True``, a rope scaling)."""
    model_type = model_type_of(arch)
    if model_type in TINY_ARCHITECTURES:
        config_class, extra = TINY_ARCHITECTURES[model_type]
        make: Callable[..., PretrainedConfig] = config_class
    else:
        # An architecture without an entry: its config class with the same small shapes.
        extra = {"num_attention_heads": 4, "num_key_value_heads": 2}
        make = lambda **kw: AutoConfig.for_model(model_type, **kw)  # noqa: E731
    fields: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **extra,
        **(overrides or {}),
    }
    return make(**fields)


def model_type_of(arch: str) -> str:
    """``"LlamaForCausalLM"`` -> ``"llama"``; a model type is returned as it is.

    Several model types may share a class (``internlm3`` also uses ``LlamaForCausalLM``): the
    one named like the class wins.
    """
    if arch in TINY_ARCHITECTURES or arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return arch
    types = [str(t) for t, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if name == arch]
    if not types:
        raise ValueError(f"transformers knows no causal-LM architecture {arch!r}")
    stem = arch.removesuffix("ForCausalLM").lower()
    return next((t for t in types if t == stem), types[0])


def tiny_model(
    arch: str,
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    logit_scale: float = 1.0,
    overrides: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A random-weight ``*ForCausalLM``; norms are randomized too, so no weight is trivial.

    ``logit_scale`` multiplies the output projection: about 25 gives logits with a standard
    deviation near 4 and a mean top probability near 0.5, like a trained model's.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, tie_word_embeddings=tie_word_embeddings, overrides=overrides),
        dtype=dtype,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.normal_()
        if logit_scale != 1.0:
            model.get_output_embeddings().weight.mul_(logit_scale)
    return model.eval()


def save_tiny_hf_checkpoint(
    directory: pathlib.Path,
    arch: str,
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    logit_scale: float = 1.0,
    overrides: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Save a tiny model and tokenizer as a Hugging Face checkpoint; return the model."""
    model = tiny_model(
        arch,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
        seed=seed,
        logit_scale=logit_scale,
        overrides=overrides,
    )
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    build_tiny_tokenizer().save_pretrained(directory)
    return model


# --- GGUF, written the way llama.cpp's converter writes it -----------------------------------

_HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def gguf_tensor_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem):
        return f"blk.{match.group(1)}.{_HF_TO_GGUF_LAYER[match.group(2)]}.{kind}"
    return f"{_HF_TO_GGUF_GLOBAL[stem]}.{kind}"


def permute_like_llama_cpp(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: the two halves of each head become interleaved."""
    half = weight.shape[0] // num_heads // 2
    per_head = weight.reshape(num_heads, 2, half, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


#: GGUF ``general.architecture`` of the Hugging Face model types llama.cpp writes under
#: another name (Mistral as Llama, Gemma 3's text model as "gemma3"); others keep theirs.
GGUF_ARCHITECTURE_NAMES = {"mistral": "llama", "gemma3_text": "gemma3"}
#: Model types written the way llama.cpp's converter writes each family (its metadata keys and
#: its tensor names, taken from the gguf package's own name map); the others as Llama.
_FAMILY_GGUF = ("gemma2", "gemma3_text", "phi3", "glm4")

#: Tiny configs that llama.cpp's format can express, for GGUF round trips: llama.cpp hard-codes
#: Gemma's query scale (the head size) and sliding pattern (Gemma 2: alternate, first local;
#: Gemma 3: five local, one global) and Gemma 3's local rope base (10000), so the Gemma models
#: here keep to them (Gemma 3 with six layers to have a global one). ``phi3_longrope`` is
#: Phi-3 with LongRoPE factors, which llama.cpp stores as tensors.
TINY_GGUF_ARCHITECTURES: dict[str, tuple[Any, dict[str, Any]]] = {
    "gemma2": (
        Gemma2Config,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,  # llama.cpp: the head size
            tie_word_embeddings=True,  # llama.cpp writes no output tensor for Gemma 2
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
        ),
    ),
    "gemma3_text": (
        Gemma3TextConfig,
        dict(
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=32,  # llama.cpp: the head size
            tie_word_embeddings=True,
            sliding_window=8,
            rope_parameters=dict(
                sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                full_attention=dict(rope_type="linear", factor=4.0, rope_theta=1e6),
            ),
        ),
    ),
    "phi3": (
        Phi3Config,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=12,
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75
            ),
        ),
    ),
    "phi3_longrope": (
        Phi3Config,
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            original_max_position_embeddings=64,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                long_factor=[1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 9.5],
                short_factor=[1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0],
            ),
        ),
    ),
    "glm4": (Glm4Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
}


def tiny_gguf_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight model of ``TINY_GGUF_ARCHITECTURES[arch]`` (64 hidden units, 2 layers
    unless the entry says otherwise), norms and biases randomized like ``tiny_model``'s."""
    config_class, extra = TINY_GGUF_ARCHITECTURES[arch]
    fields: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    fields.update(extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**fields), dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.normal_()
    return model.eval()


def write_tiny_gguf(
    path: pathlib.Path,
    arch: str,
    model: PreTrainedModel,
    *,
    quantize: Callable[[str], gguf.GGMLQuantizationType] = lambda _: gguf.GGMLQuantizationType.F32,
    tokenizer: PreTrainedTokenizerFast | None = None,
    gguf_architecture: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` as a GGUF file; ``quantize(hf_name)`` picks each tensor's type.
    ``extra_metadata``: more keys (bool, int as uint32, float as float32, str, or a list of
    one of those), for files that carry what a converter might add.

    Llama, Mistral and Qwen2/3 are written as Llama (q/k rows permuted for ``llama``);
    Gemma 2/3, Phi-3 and GLM-4 as llama.cpp's converter writes each (its keys, its tensor
    names, Gemma's norms stored as ``1 + w``, Phi-3's LongRoPE factors as tensors). A config
    llama.cpp's format cannot express is refused (``ValueError``) rather than written wrong.
    """
    config = model.config
    model_type = config.model_type if arch not in TINY_ARCHITECTURES else arch
    name = gguf_architecture or GGUF_ARCHITECTURE_NAMES.get(model_type, model_type)
    family = model_type in _FAMILY_GGUF
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, name)
    if family:
        _add_family_metadata(writer, model_type, config, head_dim)
    else:
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    for key, value in (extra_metadata or {}).items():
        _add_value(writer, key, value)

    tensor_name = _family_tensor_namer(model_type, config) if family else gguf_tensor_name
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        projection = hf_name.split(".")[-2]
        if name == "llama" and projection in heads:
            data = permute_like_llama_cpp(data, heads[projection])
        if model_type in ("gemma2", "gemma3_text") and hf_name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's Gemma converters store 1 + w
        qtype = quantize(hf_name) if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name(hf_name), data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor_name(hf_name), data.astype(np.float16))
        else:
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(tensor_name(hf_name), packed, raw_dtype=qtype)
    if model_type == "phi3" and config.rope_parameters.get("rope_type") == "longrope":
        for kind in ("long", "short"):
            factors = np.asarray(config.rope_parameters[f"{kind}_factor"], dtype=np.float32)
            writer.add_tensor(f"rope_factors_{kind}.weight", factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_family_metadata(
    writer: gguf.GGUFWriter, model_type: str, config: Any, head_dim: int
) -> None:
    """The metadata llama.cpp's converter (``convert_hf_to_gguf.py``) writes for the family."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    if model_type in ("gemma2", "gemma3_text"):
        _check_gemma_expressible(model_type, config, head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if model_type == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if model_type == "gemma3_text":
        full = rope["full_attention"]
        writer.add_rope_freq_base(float(full["rope_theta"]))
        if full.get("rope_type", "default") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
    if model_type == "phi3":
        rotary = int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size)
        rotary //= config.num_attention_heads
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_rope_dimension_count(rotary)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_sliding_window(config.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            scale = config.max_position_embeddings / config.original_max_position_embeddings
            original = config.original_max_position_embeddings
            attn_factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
            writer.add_rope_scaling_attn_factors(attn_factor)
    if model_type == "glm4":
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.5)))


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def _check_gemma_expressible(model_type: str, config: Any, head_dim: int) -> None:
    period = 2 if model_type == "gemma2" else 6
    pattern = [
        "sliding_attention" if (i + 1) % period else "full_attention"
        for i in range(config.num_hidden_layers)
    ]
    problems = []
    if config.query_pre_attn_scalar != head_dim:
        problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar} (not head_dim)")
    if list(config.layer_types) != pattern:
        problems.append(f"layer_types={list(config.layer_types)} (llama.cpp: {pattern})")
    if model_type == "gemma3_text":
        local = config.rope_parameters["sliding_attention"]
        if local.get("rope_theta") != 10000.0 or local.get("rope_type", "default") != "default":
            problems.append(f"sliding-layer rope {local} (llama.cpp: default, base 10000)")
    if problems:
        raise ValueError(
            f"llama.cpp's GGUF format cannot express this {model_type} config: "
            + "; ".join(problems)
        )


def _family_tensor_namer(model_type: str, config: Any) -> Callable[[str], str]:
    """Hugging Face name -> GGUF name, from the gguf package's own map (llama.cpp's)."""
    name = GGUF_ARCHITECTURE_NAMES.get(model_type, model_type)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    def tensor_name(hf_name: str) -> str:
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"llama.cpp has no GGUF name for {hf_name} ({name})")
        return mapped

    return tensor_name


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast) -> None:
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
