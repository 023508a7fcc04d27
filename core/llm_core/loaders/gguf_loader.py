"""GGUF checkpoints (llama.cpp's format): config from metadata, weights renamed to Hugging Face.

The ``gguf`` package reads the file (memory-mapped) and dequantizes it. What differs from a
Hugging Face checkpoint is undone here:

- names: ``blk.N.attn_q.weight`` is ``model.layers.N.self_attn.q_proj.weight`` and so on. The
  mapping is per architecture: llama.cpp's ``ffn_norm`` is Llama's ``post_attention_layernorm``
  but Gemma's ``pre_feedforward_layernorm``; Phi-3's fused ``attn_qkv`` and ``ffn_up`` (gate and
  up rows stacked) are Hugging Face's fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``;
- shapes: GGUF lists dimensions innermost first (``ne0, ne1``); the reader's arrays are
  already in numpy order, so a linear weight comes out ``(out_features, in_features)``;
- rotary layout: for ``llama``, llama.cpp's converter permutes the rows of ``q_proj`` and
  ``k_proj`` within each head so that rotary embedding works on adjacent pairs
  ``(x0, x1), (x2, x3), ...`` (GPT-J style) instead of the two halves of the head (NeoX style,
  what transformers uses). ``_unpermute_rotary_rows`` is its exact inverse. Every other
  architecture here is written unpermuted (GLM-4 rotates adjacent pairs in transformers too);
- Gemma's norms: llama.cpp stores every RMSNorm weight of ``gemma2`` and ``gemma3`` as
  ``1 + w`` (its kernel multiplies by the weight); transformers applies ``(1 + w)``, so the
  loader gives back ``w`` (in float32: the subtraction would lose bits in float16);
- config that llama.cpp keeps outside the metadata: Phi-3's LongRoPE factors are tensors
  (``rope_factors_long`` / ``rope_factors_short``) and go into ``rope_parameters``; Gemma 3's
  local rope base (10000), sliding-window pattern (five local layers, then one global) and
  query scale (the head size; ``hidden_size / num_attention_heads`` for the 62-layer 27B) are
  hard-coded in llama.cpp and rebuilt here the same way (as transformers' GGUF reader does).

Metadata that changes what the model computes and that this loader does not honour (a logit
scale, soft-caps or a sliding-window pattern on an architecture without them, ...) is refused
by key, never ignored: see ``_MATH_KEYS``.

A corrupt or cut file never reaches the reader unchecked: ``GGUFHeader.read`` walks the header
against the file size first; the metadata is read with its types checked, tensor names, types
and shapes are checked against the metadata, and anything the reader or the dequantizer still
raises becomes a ``CheckpointError`` naming the file and the tensor or key.

NaN and infinity: each tensor is checked as it is converted and a non-finite weight is refused,
naming the tensor (``check_finite``): one NaN weight silently turns every logit it reaches into
NaN, so a warning would be read too late. The check is a float32 sum per tensor, searched
element by element only when the sum is not finite: about 27 ms for the demo model's 134.5M
weights on two CPU threads, against 0.5-1.2 s to dequantize them (a full ``isfinite`` pass
would cost ~275 ms). The header checks add about 20 ms to opening it (0.5 s).
"""

from __future__ import annotations

import functools
import math
import pathlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import transformers
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from transformers import PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llm_core.loaders.chat_templates import builtin_chat_template
from llm_core.loaders.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_decoder_tensors,
    check_finite,
    describe,
)
from llm_core.loaders.gguf_header import GGUFHeader

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

#: llama.cpp's layer tensor names -> Hugging Face's, for the Llama layout (llama, qwen2, qwen3).
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

#: Gemma 2 and 3: a norm before and after both attention and MLP (llama.cpp's ``ffn_norm`` is
#: the one before the MLP, ``post_attention_norm`` the one after attention).
_GEMMA_LAYER = {
    **_LLAMA_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

#: Phi-3 / Phi-4: fused q|k|v rows and fused gate|up rows, as Hugging Face stores them.
_PHI3_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}

#: GLM-4 (0414): separate biased q/k/v, four norms, fused gate|up.
_GLM4_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_self_attn_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_mlp_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}

#: Tensors that are config, not weights: Phi-3's LongRoPE factors, Llama 3.1's rope factors.
_ROPE_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
_CONFIG_TENSORS = frozenset({*_ROPE_FACTOR_TENSORS, "rope_freqs.weight"})


@dataclass(frozen=True, slots=True)
class _Architecture:
    config_class: str  # a transformers config class name
    hf_architecture: str
    permuted_qk: bool  # llama.cpp stored q/k rows in its interleaved rotary layout
    layer_tensors: Mapping[str, str]  # GGUF layer tensor part -> Hugging Face's
    norm_plus_one: bool = False  # llama.cpp stored RMSNorm weights as 1 + w (Gemma)
    partial_rotary: bool = False  # rope.dimension_count may be below the head size
    honoured: frozenset[str] = frozenset()  # keys of _MATH_KEYS this loader honours for it


_LLAMA = MappingProxyType(_LLAMA_LAYER)

_GEMMA_KEYS = frozenset(
    {
        "attention.sliding_window",
        "attention.sliding_window_pattern",
        "final_logit_softcapping",
        "attn_logit_softcapping",
    }
)

_ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture(
        "LlamaConfig", "LlamaForCausalLM", permuted_qk=True, layer_tensors=_LLAMA
    ),
    "qwen2": _Architecture(
        "Qwen2Config", "Qwen2ForCausalLM", permuted_qk=False, layer_tensors=_LLAMA
    ),
    "qwen3": _Architecture(
        "Qwen3Config", "Qwen3ForCausalLM", permuted_qk=False, layer_tensors=_LLAMA
    ),
    "gemma2": _Architecture(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        permuted_qk=False,
        layer_tensors=MappingProxyType(_GEMMA_LAYER),
        norm_plus_one=True,
        honoured=_GEMMA_KEYS,
    ),
    "gemma3": _Architecture(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        permuted_qk=False,
        layer_tensors=MappingProxyType(_GEMMA_LAYER),
        norm_plus_one=True,
        honoured=_GEMMA_KEYS | {"rope.freq_base_swa"},
    ),
    "phi3": _Architecture(
        "Phi3Config",
        "Phi3ForCausalLM",
        permuted_qk=False,
        layer_tensors=MappingProxyType(_PHI3_LAYER),
        partial_rotary=True,
        honoured=frozenset({"attention.sliding_window", "rope.scaling.attn_factor"}),
    ),
    "glm4": _Architecture(
        "Glm4Config",
        "Glm4ForCausalLM",
        permuted_qk=False,
        layer_tensors=MappingProxyType(_GLM4_LAYER),
        partial_rotary=True,
    ),
}

#: Metadata keys (after ``ARCH.``) that change what the model computes: each with its neutral
#: values (llama.cpp's "not set") and whether it is checked for every architecture or only for
#: those added with Gemma / Phi-3 / GLM-4 (the older ones have always ignored the last two, as
#: transformers' own classes for them do). A key present with another value is refused by name
#: unless the architecture honours it (``_Architecture.honoured``).
_MATH_KEYS: dict[str, tuple[tuple[float, ...], bool]] = {
    "attention.sliding_window_pattern": ((), True),
    "attn_logit_softcapping": ((0.0,), True),
    "final_logit_softcapping": ((0.0,), True),
    "rope.freq_base_swa": ((), True),
    "rope.dimension_sections": ((), True),
    "logit_scale": ((0.0, 1.0), True),
    "embedding_scale": ((0.0, 1.0), True),
    "residual_scale": ((0.0, 1.0), True),
    "attention.scale": ((0.0,), True),
    "nextn_predict_layers": ((0.0,), True),
    "attention.sliding_window": ((0.0,), False),
    "rope.scaling.attn_factor": ((1.0,), False),
}
_NEW_ARCHITECTURES = frozenset({"gemma2", "gemma3", "phi3", "glm4"})

#: llama.cpp's layer count of the 27B Gemma models, whose query scale is hidden / heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
#: llama.cpp's Gemma 2 defaults for keys its converter may leave out.
_GEMMA2_DEFAULTS = {
    "attention.sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA_END_OF_TURN = "<end_of_turn>"

_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_NAME = re.compile(r"(\w+)\.(weight|bias)")


class GGUFCheckpoint(Checkpoint):
    """A ``.gguf`` file of a ``llama``, ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3``, ``phi3``
    or ``glm4`` model.

    ``tensors()`` yields F32 tensors as float32, F16 as float16 and BF16 as bfloat16, exactly
    as stored; every quantized type (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, ...) is dequantized to
    float32 with ``gguf.quants.dequantize``. Gemma's norm weights are yielded as float32
    ``stored - 1`` (see the module docstring). The tokenizer is rebuilt from the GGUF metadata
    by transformers; a Gemma file without a chat template gets llm-core's built-in Gemma
    template (``llm_core/templates/chat/gemma.jinja``).
    """

    format = "gguf"

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.header = GGUFHeader.read(path)
        self.reader = _open_reader(path, self.header)
        name = self._metadata_str("general.architecture", None)
        if name not in _ARCHITECTURES:
            raise CheckpointError(
                f"{path}: GGUF architecture {name!r} is not supported. Supported: "
                f"{', '.join(sorted(_ARCHITECTURES))}. Use a Hugging Face safetensors "
                "checkpoint of the model instead, if its architecture is supported."
            )
        self.gguf_architecture: str = name
        self._arch = _ARCHITECTURES[name]
        for tensor in self.reader.tensors:
            _check_convertible(path, tensor)
        self._config_tensors = {t.name: t for t in self.reader.tensors if t.name in _CONFIG_TENSORS}
        self._entries = [
            (_hf_name(path, t.name, name, self._arch.layer_tensors), t)
            for t in self.reader.tensors
            if t.name not in _CONFIG_TENSORS
        ]
        self.chat_template = self._metadata_str("tokenizer.chat_template", None)
        if self.chat_template is None:
            self.chat_template = builtin_chat_template(name)
        super().__init__(path, self._build_config())
        self._check_tensors()

    def tensor_names(self) -> list[str]:
        return [hf_name for hf_name, _ in self._entries]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        heads = {
            "q_proj": self.config.num_attention_heads,
            "k_proj": self.config.num_key_value_heads,
        }
        for hf_name, tensor in self._entries:
            try:
                # Overflow to inf in a corrupt scale is reported by check_finite, not numpy.
                with np.errstate(all="ignore"):
                    weight = _to_torch(tensor)
                projection = hf_name.split(".")[-2]
                if self._arch.permuted_qk and projection in heads:
                    weight = _unpermute_rotary_rows(weight, heads[projection])
                if self._arch.norm_plus_one and hf_name.endswith("norm.weight"):
                    weight = weight.float() - 1.0  # llama.cpp stored 1 + w
            except Exception as exc:  # whatever numpy or gguf raise on bad data
                raise CheckpointError(
                    f"{self.path}: tensor {tensor.name} ({tensor.tensor_type.name}, dimensions "
                    f"{[int(d) for d in tensor.shape]}) cannot be read ({describe(exc)}). The file "
                    "is corrupt: download or convert it again."
                ) from exc
            check_finite(self.path, tensor.name, weight)
            yield hf_name, weight

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
            if self.reader.get_field(key) is None:
                raise CheckpointError(
                    f"{self.path}: GGUF metadata {key} is missing, so the file has no usable "
                    "tokenizer. Convert the model again with its tokenizer."
                )
        try:
            # The fast-tokenizer class builds the same tokenizer AutoTokenizer does from a GGUF;
            # AutoTokenizer would first re-parse the whole file for a config it does not need.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(
                str(self.path.parent), gguf_file=self.path.name, local_files_only=True
            )
        except Exception as exc:  # transformers and tokenizers raise many types on bad data
            raise CheckpointError(
                f"{self.path}: transformers cannot build a tokenizer from this GGUF's "
                f"tokenizer.ggml.* metadata ({describe(exc)})."
            ) from exc
        if self.chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = self.chat_template
        return tokenizer

    # -- metadata, each value read with its type checked ------------------------------------

    def _metadata(self, key: str, default: Any) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:  # a string that is not UTF-8, a malformed array
            raise CheckpointError(
                f"{self.path}: GGUF metadata {key} cannot be read ({describe(exc)})."
            ) from exc

    def _metadata_str(self, key: str, default: str | None) -> str | None:
        value = self._metadata(key, default)
        if value is not None and not isinstance(value, str):
            self._bad_metadata(key, value, "a string")
        return value

    def _metadata_int(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self._metadata(key, default)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata {key} is missing.")
        if isinstance(value, list):
            raise CheckpointError(
                f"{self.path}: GGUF metadata {key} varies per layer ({value[:4]}...), "
                "which this loader does not support."
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self._bad_metadata(key, value, f"an integer of at least {minimum}")
        return value

    def _metadata_float(self, key: str, default: float | None = None) -> float:
        value = self._metadata(key, default)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata {key} is missing.")
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            self._bad_metadata(key, value, "a positive number")
        if not math.isfinite(value):
            self._bad_metadata(key, value, "a finite number")
        return float(value)

    def _token_id(self, key: str, vocab_size: int) -> int | None:
        value = self._metadata(key, None)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            self._bad_metadata(key, value, f"a token id below the vocabulary size {vocab_size}")
        return value

    def _bad_metadata(self, key: str, value: Any, expected: str) -> None:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise CheckpointError(
            f"{self.path}: GGUF metadata {key} is {shown} ({type(value).__name__}), expected "
            f"{expected}: the file is corrupt or was written by a converter this loader does "
            "not know."
        )

    def _build_config(self) -> PretrainedConfig:
        arch = self.gguf_architecture
        by_name = {t.name: t for _, t in self._entries}

        if "rope_freqs.weight" in self._config_tensors:
            raise CheckpointError(
                f"{self.path}: this GGUF stores per-frequency rope factors (rope_freqs.weight, "
                "Llama 3.1-style rope scaling), which this loader does not support yet. Use "
                "the Hugging Face safetensors checkpoint instead."
            )
        if self._config_tensors and arch != "phi3":
            names = ", ".join(sorted(self._config_tensors))
            raise CheckpointError(
                f"{self.path}: tensors {names} (LongRoPE factors) are not expected in a GGUF of "
                f"architecture {arch!r}; this loader reads them for phi3 only."
            )
        self._check_math_keys()
        for required_tensor in ("token_embd.weight", "output_norm.weight"):
            if required_tensor not in by_name:
                raise CheckpointError(
                    f"{self.path}: tensor {required_tensor} is missing: the file is incomplete "
                    "or corrupt."
                )
        embedding = by_name["token_embd.weight"]
        if len(embedding.shape) != 2:
            raise CheckpointError(
                f"{self.path}: tensor token_embd.weight has dimensions "
                f"{[int(d) for d in embedding.shape]}, expected two: the file is corrupt."
            )
        vocab_size = int(embedding.shape[1])
        hidden_size = self._metadata_int(f"{arch}.embedding_length")
        num_heads = self._metadata_int(f"{arch}.attention.head_count")
        num_layers = self._metadata_int(f"{arch}.block_count")
        head_dim = self._metadata_int(f"{arch}.attention.key_length", hidden_size // num_heads)
        value_dim = self._metadata_int(f"{arch}.attention.value_length", head_dim)
        if value_dim != head_dim:
            raise CheckpointError(
                f"{self.path}: GGUF metadata {arch}.attention.value_length={value_dim} differs "
                f"from the key size {head_dim}, which this loader does not support."
            )
        if arch == "phi3" and head_dim != hidden_size // num_heads:
            raise CheckpointError(
                f"{self.path}: GGUF metadata {arch}.attention.key_length={head_dim} differs from "
                f"embedding_length / head_count = {hidden_size // num_heads}; Phi-3 has no "
                "separate head size."
            )
        rotary_dim = self._metadata_int(f"{arch}.rope.dimension_count", head_dim)
        if rotary_dim != head_dim and not (
            self._arch.partial_rotary and rotary_dim < head_dim and rotary_dim % 2 == 0
        ):
            raise CheckpointError(
                f"{self.path}: rotary embedding on {rotary_dim} of {head_dim} head dimensions "
                f"({arch}.rope.dimension_count) is not supported for this architecture."
            )
        if self._arch.permuted_qk and head_dim % 2:
            raise CheckpointError(
                f"{self.path}: GGUF metadata gives an odd head size {head_dim} "
                f"({arch}.attention.key_length or embedding_length / head_count); rotary "
                "embedding needs an even one: the file is corrupt."
            )
        rope: dict[str, Any] = {"rope_type": "default"}
        if self.reader.get_field(f"{arch}.rope.freq_base") is not None:
            rope["rope_theta"] = self._metadata_float(f"{arch}.rope.freq_base")
        rope.update(self._rope_scaling())
        if rotary_dim != head_dim:
            rope["partial_rotary_factor"] = rotary_dim / head_dim

        eos = self._token_id("tokenizer.ggml.eos_token_id", vocab_size)
        eot = self._token_id("tokenizer.ggml.eot_token_id", vocab_size)
        eos_ids = [i for i in (eos, eot) if i is not None]
        if self._arch.norm_plus_one:
            # Gemma ends a turn with <end_of_turn>; llama.cpp stops on it whatever the metadata.
            end_of_turn = self._token_with_text(_GEMMA_END_OF_TURN)
            if end_of_turn is not None:
                eos_ids.append(end_of_turn)
        eos_ids = list(dict.fromkeys(eos_ids))
        kwargs: dict[str, Any] = {
            "architectures": [self._arch.hf_architecture],
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": self._metadata_int(f"{arch}.feed_forward_length"),
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": self._metadata_int(f"{arch}.attention.head_count_kv", num_heads),
            "head_dim": head_dim,
            "max_position_embeddings": self._metadata_int(f"{arch}.context_length"),
            "rms_norm_eps": self._metadata_float(f"{arch}.attention.layer_norm_rms_epsilon"),
            "rope_parameters": rope,
            "tie_word_embeddings": "output.weight" not in by_name,
            "bos_token_id": self._token_id("tokenizer.ggml.bos_token_id", vocab_size),
            # Chat models end a turn with EOT; generation must stop on either.
            "eos_token_id": (eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
            "pad_token_id": self._token_id("tokenizer.ggml.padding_token_id", vocab_size),
        }
        if arch in ("llama", "qwen3"):
            kwargs["attention_bias"] = "blk.0.attn_q.bias" in by_name
        if arch == "llama":
            kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in by_name
        if arch == "glm4":
            kwargs["attention_bias"] = "blk.0.attn_q.bias" in by_name
        if arch in ("gemma2", "gemma3"):
            kwargs.update(self._gemma_config(hidden_size, num_heads, num_layers, head_dim, rope))
        if arch == "phi3":
            del kwargs["head_dim"]  # Phi3Config has none: hidden_size / num_attention_heads
            kwargs.update(self._phi3_config(rope, rotary_dim))
        config_class = getattr(transformers, self._arch.config_class)
        try:
            config: PretrainedConfig = config_class(**kwargs)
        except Exception as exc:  # transformers validates some values itself
            raise CheckpointError(
                f"{self.path}: the GGUF metadata makes an invalid {self._arch.config_class} "
                f"({describe(exc)})."
            ) from exc
        config.name_or_path = str(self.path)
        return config

    def _gemma_config(
        self, hidden_size: int, num_heads: int, num_layers: int, head_dim: int, rope: dict[str, Any]
    ) -> dict[str, Any]:
        """Gemma 2 / 3: sliding-window pattern, query scale, soft-caps and (Gemma 3) the rope of
        local and global layers, as llama.cpp derives them."""
        arch = self.gguf_architecture
        gemma2 = arch == "gemma2"
        defaults: dict[str, Any] = _GEMMA2_DEFAULTS if gemma2 else {}

        window_key = f"{arch}.attention.sliding_window"
        window: int | None = defaults.get("attention.sliding_window")
        if self.reader.get_field(window_key) is not None:
            window = self._metadata_int(window_key, minimum=0) or None
        if window is None:
            layer_types = ["full_attention"] * num_layers
        else:
            layer_types = self._sliding_pattern(num_layers, period=2 if gemma2 else 6)

        softcaps: dict[str, float | None] = {}
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            key = f"{arch}.{name}"
            value = defaults.get(name)
            if self.reader.get_field(key) is not None:
                value = self._metadata_float(key)
            softcaps[name] = value

        # llama.cpp (after gemma_pytorch): the 27B models scale queries by hidden / heads.
        is_27b = num_layers == _GEMMA_27B_LAYERS[arch]
        scalar = hidden_size // num_heads if is_27b else head_dim
        extra: dict[str, Any] = {
            "query_pre_attn_scalar": scalar,
            "sliding_window": window,
            "layer_types": layer_types,
            **softcaps,
        }
        if not gemma2:
            # Rope scaling (linear, 4B and up) applies to the global layers only.
            local_key = f"{arch}.rope.freq_base_swa"
            local_base = _GEMMA3_LOCAL_ROPE_BASE
            if self.reader.get_field(local_key) is not None:
                local_base = self._metadata_float(local_key)
            extra["rope_parameters"] = {
                "full_attention": {"rope_theta": 1_000_000.0, **rope},
                "sliding_attention": {"rope_type": "default", "rope_theta": local_base},
            }
        return extra

    def _sliding_pattern(self, num_layers: int, period: int) -> list[str]:
        """``layer_types`` from ``ARCH.attention.sliding_window_pattern`` (a period, or one bool
        per layer: true for sliding), else llama.cpp's fixed period for the architecture: the
        last layer of each period is global."""
        key = f"{self.gguf_architecture}.attention.sliding_window_pattern"
        value = self._metadata(key, None)
        if isinstance(value, list):
            if len(value) != num_layers or not all(isinstance(v, bool) for v in value):
                self._bad_metadata(key, value, f"{num_layers} booleans (one per layer)")
            return ["sliding_attention" if v else "full_attention" for v in value]
        if value is not None:
            period = self._metadata_int(key)
        return [
            "sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)
        ]

    def _phi3_config(self, rope: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
        """Phi-3 / Phi-4: sliding window (0: none, Phi-4), and LongRoPE from the factor tensors."""
        arch = self.gguf_architecture
        extra: dict[str, Any] = {}
        window_key = f"{arch}.attention.sliding_window"
        if self.reader.get_field(window_key) is not None:
            extra["sliding_window"] = self._metadata_int(window_key, minimum=0) or None
        original_key = f"{arch}.rope.scaling.original_context_length"
        if self.reader.get_field(original_key) is not None:
            extra["original_max_position_embeddings"] = self._metadata_int(original_key)
        factors = {name: self._config_tensors.get(name) for name in _ROPE_FACTOR_TENSORS}
        present = [name for name, tensor in factors.items() if tensor is not None]
        if not present:
            attn_key = f"{arch}.rope.scaling.attn_factor"
            if self.reader.get_field(attn_key) is not None:
                raise CheckpointError(
                    f"{self.path}: GGUF metadata {attn_key} is set but the file has no LongRoPE "
                    "factor tensors (rope_factors_long / rope_factors_short): the file is "
                    "incomplete or was written by a converter this loader does not know."
                )
            return extra
        if len(present) != 2:
            missing = next(name for name in _ROPE_FACTOR_TENSORS if name not in present)
            raise CheckpointError(
                f"{self.path}: tensor {missing} is missing (the file has {present[0]}): LongRoPE "
                "needs both factor lists; the file is incomplete or corrupt."
            )
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(
                f"{self.path}: GGUF metadata {arch}.rope.scaling.type={rope['rope_type']!r} "
                "together with LongRoPE factor tensors is not supported."
            )
        if "original_max_position_embeddings" not in extra:
            raise CheckpointError(
                f"{self.path}: GGUF metadata {original_key} is missing; LongRoPE needs it."
            )
        lists: dict[str, list[float]] = {}
        for name, tensor in factors.items():
            assert tensor is not None
            values = _to_torch(tensor).float().flatten()
            if values.numel() != rotary_dim // 2 or not bool(torch.isfinite(values).all()):
                raise CheckpointError(
                    f"{self.path}: tensor {name} holds {values.numel()} values, expected "
                    f"{rotary_dim // 2} finite ones (half of {arch}.rope.dimension_count): the "
                    "file is corrupt."
                )
            lists[name] = [float(v) for v in values.tolist()]
        rope["rope_type"] = "longrope"
        rope["long_factor"] = lists["rope_factors_long.weight"]
        rope["short_factor"] = lists["rope_factors_short.weight"]
        attn_key = f"{arch}.rope.scaling.attn_factor"
        if self.reader.get_field(attn_key) is not None:
            rope["attention_factor"] = self._metadata_float(attn_key)
        return extra

    def _check_math_keys(self) -> None:
        """Refuse metadata that changes the computation and is not honoured (``_MATH_KEYS``)."""
        arch = self.gguf_architecture
        for suffix, (neutral, every_architecture) in _MATH_KEYS.items():
            if suffix in self._arch.honoured:
                continue
            if not every_architecture and arch not in _NEW_ARCHITECTURES:
                continue
            key = f"{arch}.{suffix}"
            if self.reader.get_field(key) is None:
                continue
            value = self._metadata(key, None)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and value in neutral:
                continue
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise CheckpointError(
                f"{self.path}: GGUF metadata {key}={shown} changes what the model computes, and "
                f"this loader does not implement it for architecture {arch!r}. Use a Hugging "
                "Face safetensors checkpoint of the model instead, if its architecture is "
                "supported."
            )

    def _token_with_text(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled ``text``, or ``None`` (a scan of the raw
        strings: about 40 ms for Gemma 3's 262k tokens)."""
        field = self.reader.get_field("tokenizer.ggml.tokens")
        if field is None:
            return None
        wanted = text.encode()
        for token_id, index in enumerate(field.data):
            part = field.parts[index]
            if len(part) == len(wanted) and part.tobytes() == wanted:
                return token_id
        return None

    def _rope_scaling(self) -> dict[str, Any]:
        arch = self.gguf_architecture
        kind = self._metadata_str(f"{arch}.rope.scaling.type", "none")
        if kind == "none":
            return {}
        factor = self._metadata_float(f"{arch}.rope.scaling.factor", 1.0)
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            key = f"{arch}.rope.scaling.original_context_length"
            if self.reader.get_field(key) is None:
                raise CheckpointError(f"{self.path}: yarn rope scaling without {key}.")
            return {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": self._metadata_int(key),
            }
        raise CheckpointError(f"{self.path}: rope scaling type {kind!r} is not supported.")

    def _check_tensors(self) -> None:
        """Every tensor's shape against the metadata, every layer complete, before any read."""
        gguf_names = {hf_name: t.name for hf_name, t in self._entries}
        shapes = {hf_name: tuple(int(d) for d in reversed(t.shape)) for hf_name, t in self._entries}
        check_decoder_tensors(
            self.path,
            self.config,
            shapes,
            source="the GGUF metadata",
            stored_name=lambda hf_name: gguf_names.get(
                hf_name, _gguf_name(hf_name, self._arch.layer_tensors)
            ),
        )


class _PlainArrayReader(GGUFReader):
    """``GGUFReader`` slicing a plain ndarray view of its memmap: the same values.

    The reader slices the file once per metadata item; on an ``np.memmap`` each slice
    builds a memmap subclass, which made parsing a 49k-token vocabulary take ~3x longer.
    """

    def _get(
        self,
        offset: int,
        dtype: npt.DTypeLike,
        count: int = 1,
        override_order: Any = None,
    ) -> npt.NDArray[Any]:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        arr = plain[offset:end].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


def _open_reader(path: pathlib.Path, header: GGUFHeader) -> GGUFReader:
    """The ``gguf`` reader on a file whose header ``GGUFHeader.read`` has already checked."""
    try:
        reader = _PlainArrayReader(path)
    except Exception as exc:  # the checks above should leave nothing; never a traceback
        raise CheckpointError(f"{path}: not a readable GGUF file ({describe(exc)}).") from exc
    if reader.data_offset != header.data_offset or len(reader.tensors) != len(header.tensors):
        raise CheckpointError(
            f"{path}: not a readable GGUF file: the gguf reader finds {len(reader.tensors)} "
            f"tensors with data at offset {reader.data_offset}, the header check "
            f"{len(header.tensors)} at {header.data_offset}."
        )
    return reader


@functools.cache
def _can_convert(kind: GGMLQuantizationType) -> bool:
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return True
    _, type_size = GGML_QUANT_SIZES[kind]
    try:
        dequantize(np.zeros(type_size, dtype=np.uint8), kind)  # one block of zeros
    except NotImplementedError:
        return False
    return True


def _check_convertible(path: pathlib.Path, tensor: ReaderTensor) -> None:
    if not _can_convert(tensor.tensor_type):
        raise CheckpointError(
            f"{path}: tensor {tensor.name} uses {tensor.tensor_type.name}, which the installed "
            "gguf package cannot dequantize; upgrade gguf or requantize the file."
        )


def _hf_name(
    path: pathlib.Path, gguf_name: str, architecture: str, layer_tensors: Mapping[str, str]
) -> str:
    if match := _LAYER_NAME.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in layer_tensors:
            return f"model.layers.{layer}.{layer_tensors[part]}.{kind}"
    elif (match := _GLOBAL_NAME.fullmatch(gguf_name)) and match.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[match.group(1)]}.{match.group(2)}"
    raise CheckpointError(
        f"{path}: tensor {gguf_name!r} has no Hugging Face counterpart in this loader for GGUF "
        f"architecture {architecture!r}; the file holds a model variant that is not supported."
    )


def _gguf_name(hf_name: str, layer_tensors: Mapping[str, str]) -> str:
    """The GGUF name of a Hugging Face tensor name (for messages about missing tensors)."""
    stem, kind = hf_name.rsplit(".", 1)
    if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem):
        layer, part = match.groups()
        gguf_part = next((g for g, hf in layer_tensors.items() if hf == part), part)
        return f"blk.{layer}.{gguf_part}.{kind}"
    gguf_global = next((g for g, hf in _GLOBAL_TENSORS.items() if hf == stem), stem)
    return f"{gguf_global}.{kind}"


def _to_torch(tensor: ReaderTensor) -> torch.Tensor:
    """One GGUF tensor as a contiguous CPU tensor in numpy dimension order."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    kind = tensor.tensor_type
    if kind == GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(shape)
    if kind == GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(tensor.data, dtype=np.float16)).reshape(shape)
    if kind == GGMLQuantizationType.BF16:
        bits = np.array(tensor.data, dtype=np.uint8).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    values = dequantize(tensor.data, kind)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: row ``2i + j`` of a head back to ``j * d/2 + i``.

    ``weight`` is ``(num_heads * head_dim, ...)`` (a weight or a bias). llama.cpp moved row
    ``j * head_dim/2 + i`` (half ``j``, index ``i``) of each head to ``2i + j``.
    """
    half = weight.shape[0] // num_heads // 2
    per_head = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # (h, d/2, 2, ...)
    return per_head.transpose(1, 2).reshape(weight.shape).contiguous()  # (h, 2, d/2, ...)
