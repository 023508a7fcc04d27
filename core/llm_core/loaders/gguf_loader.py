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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import transformers
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from transformers import PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llm_core.loaders.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_decoder_tensors,
    check_finite,
    describe,
)
from llm_core.loaders.gguf_header import GGUFHeader


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

_GGUF_LAYER_PART = {hf: gguf for gguf, hf in _LAYER_TENSORS.items()}
_GGUF_GLOBAL = {hf: gguf for gguf, hf in _GLOBAL_TENSORS.items()}

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
        self._entries = [(_hf_name(path, t.name), t) for t in self.reader.tensors]
        for _, tensor in self._entries:
            _check_convertible(path, tensor)
        self.chat_template = self._metadata_str("tokenizer.chat_template", None)
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

        if "rope_freqs.weight" in by_name:
            raise CheckpointError(
                f"{self.path}: this GGUF stores per-frequency rope factors (rope_freqs.weight, "
                "Llama 3.1-style rope scaling), which this loader does not support yet. Use "
                "the Hugging Face safetensors checkpoint instead."
            )
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
        head_dim = self._metadata_int(f"{arch}.attention.key_length", hidden_size // num_heads)
        rotary_dim = self._metadata_int(f"{arch}.rope.dimension_count", head_dim)
        if rotary_dim != head_dim:
            raise CheckpointError(
                f"{self.path}: rotary embedding on {rotary_dim} of {head_dim} head dimensions "
                "(partial rotary) is not supported for this architecture."
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

        eos = self._token_id("tokenizer.ggml.eos_token_id", vocab_size)
        eot = self._token_id("tokenizer.ggml.eot_token_id", vocab_size)
        kwargs: dict[str, Any] = {
            "architectures": [self._arch.hf_architecture],
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": self._metadata_int(f"{arch}.feed_forward_length"),
            "num_hidden_layers": self._metadata_int(f"{arch}.block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": self._metadata_int(f"{arch}.attention.head_count_kv", num_heads),
            "head_dim": head_dim,
            "max_position_embeddings": self._metadata_int(f"{arch}.context_length"),
            "rms_norm_eps": self._metadata_float(f"{arch}.attention.layer_norm_rms_epsilon"),
            "rope_parameters": rope,
            "tie_word_embeddings": "output.weight" not in by_name,
            "bos_token_id": self._token_id("tokenizer.ggml.bos_token_id", vocab_size),
            # Chat models end a turn with EOT; generation must stop on either.
            "eos_token_id": eos if eot is None or eot == eos else [eos, eot],
            "pad_token_id": self._token_id("tokenizer.ggml.padding_token_id", vocab_size),
        }
        if arch in ("llama", "qwen3"):
            kwargs["attention_bias"] = "blk.0.attn_q.bias" in by_name
        if arch == "llama":
            kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in by_name
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
            stored_name=lambda hf_name: gguf_names.get(hf_name, _gguf_name(hf_name)),
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


def _gguf_name(hf_name: str) -> str:
    """The GGUF name of a Hugging Face tensor name (for messages about missing tensors)."""
    stem, kind = hf_name.rsplit(".", 1)
    if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem):
        layer, part = match.groups()
        return f"blk.{layer}.{_GGUF_LAYER_PART.get(part, part)}.{kind}"
    return f"{_GGUF_GLOBAL.get(stem, stem)}.{kind}"


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
