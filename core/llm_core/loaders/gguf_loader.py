"""GGUF checkpoints (llama.cpp's format): config from metadata, weights renamed to Hugging Face.

The ``gguf`` package reads the file (memory-mapped) and dequantizes it. Three things differ
from a Hugging Face checkpoint and are undone here:

- names: ``blk.N.attn_q.weight`` is ``model.layers.N.self_attn.q_proj.weight`` and so on;
- shapes: GGUF lists dimensions innermost first (``ne0, ne1``); the reader's arrays are
  already in numpy order, so a linear weight comes out ``(out_features, in_features)``;
- rotary layout: for ``llama``, llama.cpp's converter permutes the rows of ``q_proj`` and
  ``k_proj`` within each head so that rotary embedding works on adjacent pairs
  ``(x0, x1), (x2, x3), ...`` (GPT-J style) instead of the two halves of the head (NeoX style,
  what transformers uses). ``_unpermute_rotary_rows`` is its exact inverse. ``qwen2`` and
  ``qwen3`` files are written unpermuted.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from transformers import PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llm_core.loaders.checkpoint import Checkpoint, CheckpointError


@dataclass(frozen=True, slots=True)
class _Architecture:
    config_class: str  # a transformers config class name
    hf_architecture: str
    permuted_qk: bool  # llama.cpp stored q/k rows in its interleaved rotary layout


_ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture("LlamaConfig", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": _Architecture("Qwen2Config", "Qwen2ForCausalLM", permuted_qk=False),
    "qwen3": _Architecture("Qwen3Config", "Qwen3ForCausalLM", permuted_qk=False),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_TENSORS = {
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

_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_NAME = re.compile(r"(\w+)\.(weight|bias)")


class GGUFCheckpoint(Checkpoint):
    """A ``.gguf`` file of a ``llama``, ``qwen2`` or ``qwen3`` model.

    ``tensors()`` yields F32 tensors as float32, F16 as float16 and BF16 as bfloat16, exactly
    as stored; every quantized type (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, ...) is dequantized to
    float32 with ``gguf.quants.dequantize``. The tokenizer is rebuilt from the GGUF metadata by
    transformers.
    """

    format = "gguf"

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.reader = _open_reader(path)
        name = self._metadata("general.architecture", None)
        if name not in _ARCHITECTURES:
            raise CheckpointError(
                f"{path}: GGUF architecture {name!r} is not supported. Supported: "
                f"{', '.join(sorted(_ARCHITECTURES))}. Use a Hugging Face safetensors "
                "checkpoint of the model instead, if its architecture is supported."
            )
        self.gguf_architecture: str = name
        self._arch = _ARCHITECTURES[name]
        self._entries = [(_hf_name(path, t.name), t) for t in self.reader.tensors]
        self.chat_template: str | None = self._metadata("tokenizer.chat_template", None)
        super().__init__(path, self._build_config())
        self._check_attention_shapes()

    def tensor_names(self) -> list[str]:
        return [hf_name for hf_name, _ in self._entries]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        heads = {
            "q_proj": self.config.num_attention_heads,
            "k_proj": self.config.num_key_value_heads,
        }
        for hf_name, tensor in self._entries:
            weight = _to_torch(self.path, tensor)
            projection = hf_name.split(".")[-2]
            if self._arch.permuted_qk and projection in heads:
                weight = _unpermute_rotary_rows(weight, heads[projection])
            yield hf_name, weight

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            # The fast-tokenizer class builds the same tokenizer AutoTokenizer does from a GGUF;
            # AutoTokenizer would first re-parse the whole file for a config it does not need.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(
                str(self.path.parent), gguf_file=self.path.name, local_files_only=True
            )
        except (OSError, ValueError, KeyError, NotImplementedError) as exc:
            raise CheckpointError(
                f"{self.path}: transformers cannot build a tokenizer from this GGUF ({exc})."
            ) from exc
        if self.chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = self.chat_template
        return tokenizer

    def _metadata(self, key: str, default: Any) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def _build_config(self) -> PretrainedConfig:
        arch = self.gguf_architecture
        by_name = {t.name: t for _, t in self._entries}

        def required(key: str) -> Any:
            value = self._metadata(f"{arch}.{key}", None)
            if value is None:
                raise CheckpointError(f"{self.path}: GGUF metadata {arch}.{key} is missing.")
            if isinstance(value, list):
                raise CheckpointError(
                    f"{self.path}: GGUF metadata {arch}.{key} varies per layer ({value[:4]}...), "
                    "which this loader does not support."
                )
            return value

        if "rope_freqs.weight" in by_name:
            raise CheckpointError(
                f"{self.path}: this GGUF stores per-frequency rope factors (rope_freqs.weight, "
                "Llama 3.1-style rope scaling), which this loader does not support yet. Use "
                "the Hugging Face safetensors checkpoint instead."
            )
        hidden_size = int(required("embedding_length"))
        num_heads = int(required("attention.head_count"))
        head_dim = int(self._metadata(f"{arch}.attention.key_length", hidden_size // num_heads))
        rotary_dim = int(self._metadata(f"{arch}.rope.dimension_count", head_dim))
        if rotary_dim != head_dim:
            raise CheckpointError(
                f"{self.path}: rotary embedding on {rotary_dim} of {head_dim} head dimensions "
                "(partial rotary) is not supported for this architecture."
            )
        rope: dict[str, Any] = {"rope_type": "default"}
        theta = self._metadata(f"{arch}.rope.freq_base", None)
        if theta is not None:
            rope["rope_theta"] = float(theta)
        rope.update(self._rope_scaling())

        eos = self._metadata("tokenizer.ggml.eos_token_id", None)
        eot = self._metadata("tokenizer.ggml.eot_token_id", None)
        kwargs: dict[str, Any] = {
            "architectures": [self._arch.hf_architecture],
            "vocab_size": int(by_name["token_embd.weight"].shape[1]),
            "hidden_size": hidden_size,
            "intermediate_size": int(required("feed_forward_length")),
            "num_hidden_layers": int(required("block_count")),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(
                self._metadata(f"{arch}.attention.head_count_kv", num_heads)
            ),
            "head_dim": head_dim,
            "max_position_embeddings": int(required("context_length")),
            "rms_norm_eps": float(required("attention.layer_norm_rms_epsilon")),
            "rope_parameters": rope,
            "tie_word_embeddings": "output.weight" not in by_name,
            "bos_token_id": self._metadata("tokenizer.ggml.bos_token_id", None),
            # Chat models end a turn with EOT; generation must stop on either.
            "eos_token_id": eos if eot is None or eot == eos else [eos, eot],
            "pad_token_id": self._metadata("tokenizer.ggml.padding_token_id", None),
        }
        if arch in ("llama", "qwen3"):
            kwargs["attention_bias"] = "blk.0.attn_q.bias" in by_name
        if arch == "llama":
            kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in by_name
        config_class = getattr(transformers, self._arch.config_class)
        config: PretrainedConfig = config_class(**kwargs)
        config.name_or_path = str(self.path)
        return config

    def _rope_scaling(self) -> dict[str, Any]:
        arch = self.gguf_architecture
        kind = self._metadata(f"{arch}.rope.scaling.type", "none")
        if kind == "none":
            return {}
        factor = float(self._metadata(f"{arch}.rope.scaling.factor", 1.0))
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            original = self._metadata(f"{arch}.rope.scaling.original_context_length", None)
            if original is None:
                raise CheckpointError(
                    f"{self.path}: yarn rope scaling without "
                    f"{arch}.rope.scaling.original_context_length."
                )
            return {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": int(original),
            }
        raise CheckpointError(f"{self.path}: rope scaling type {kind!r} is not supported.")

    def _check_attention_shapes(self) -> None:
        head_dim = self.config.head_dim
        heads = {
            "q_proj": self.config.num_attention_heads,
            "k_proj": self.config.num_key_value_heads,
        }
        for hf_name, tensor in self._entries:
            projection = hf_name.split(".")[-2]
            if projection not in heads:
                continue
            rows = int(tensor.shape[-1] if len(tensor.shape) > 1 else tensor.shape[0])
            if rows != heads[projection] * head_dim or head_dim % 2:
                raise CheckpointError(
                    f"{self.path}: {tensor.name} has {rows} rows, expected "
                    f"{heads[projection]} heads x {head_dim} (an even head size); the "
                    "metadata and the tensors disagree."
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


def _open_reader(path: pathlib.Path) -> GGUFReader:
    try:
        reader = _PlainArrayReader(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc}).") from exc
    if reader.byte_order != "I":
        raise CheckpointError(
            f"{path}: a GGUF file of the other byte order (big-endian) is not supported."
        )
    return reader


def _hf_name(path: pathlib.Path, gguf_name: str) -> str:
    if match := _LAYER_NAME.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}"
    elif (match := _GLOBAL_NAME.fullmatch(gguf_name)) and match.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[match.group(1)]}.{match.group(2)}"
    raise CheckpointError(
        f"{path}: tensor {gguf_name!r} has no Hugging Face counterpart in this loader; "
        "the file holds a model variant that is not supported."
    )


def _to_torch(path: pathlib.Path, tensor: ReaderTensor) -> torch.Tensor:
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
    try:
        values = dequantize(tensor.data, kind)
    except NotImplementedError as exc:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} uses {kind.name}, which the installed gguf package "
            "cannot dequantize; upgrade gguf or requantize the file."
        ) from exc
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: row ``2i + j`` of a head back to ``j * d/2 + i``.

    ``weight`` is ``(num_heads * head_dim, ...)`` (a weight or a bias). llama.cpp moved row
    ``j * head_dim/2 + i`` (half ``j``, index ``i``) of each head to ``2i + j``.
    """
    half = weight.shape[0] // num_heads // 2
    per_head = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # (h, d/2, 2, ...)
    return per_head.transpose(1, 2).reshape(weight.shape).contiguous()  # (h, 2, d/2, ...)
