"""The checkpoint contract every model format implements (``open_checkpoint`` in
:mod:`llm_core.loaders.opener` picks one).

A checkpoint is read-only, host-side and lazy: opening it reads the config and the tensor
index; ``tensors()`` streams the weights one at a time so a model never needs two copies in
memory. Pickle files (``*.bin``, ``*.pt``) are never loaded, and nothing is ever downloaded
from a model hub.

Every way a file on disk can be wrong ends in one ``CheckpointError`` whose message names the
file, the tensor or field, and what is wrong: the loaders check headers, configs and shapes
before the third-party readers (``gguf``, ``safetensors``, transformers) see them, and wrap
whatever those readers still raise. Weights are checked for NaN and infinity as each tensor is
converted: see ``check_finite``.
"""

from __future__ import annotations

import pathlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


class CheckpointError(ValueError):
    """A checkpoint cannot be opened or read. The message says what was wrong and what to do.

    A ``ValueError``, so the CLI prints it as one ``llm-core: error: ...`` line.
    """


class Checkpoint(ABC):
    """One model on disk: its Hugging Face config, its weights and its tokenizer.

    Attributes:
        path: the checkpoint directory (Hugging Face format) or the ``.gguf`` file.
        format: ``"hf"`` or ``"gguf"``.
        config: a ``transformers.PretrainedConfig`` with ``architectures`` set (for example
            ``["LlamaForCausalLM"]``).
    """

    format: ClassVar[str]

    def __init__(self, path: pathlib.Path, config: PretrainedConfig) -> None:
        self.path = path
        self.config = config

    @property
    def architecture(self) -> str:
        """The first entry of ``config.architectures``, the name models are registered under."""
        architectures = self.config.architectures or []
        if not architectures:
            raise CheckpointError(f"{self.path}: the config names no architecture")
        return str(architectures[0])

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """Hugging Face names of every weight ``tensors()`` yields, in the same order."""

    @abstractmethod
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every weight as ``(name, tensor)``: a contiguous CPU tensor, one at a time.

        Names are those of the transformers ``*ForCausalLM`` state dict
        (``model.embed_tokens.weight``, ``model.layers.0.self_attn.q_proj.weight``, ...,
        ``lm_head.weight`` only when the checkpoint stores it; with tied embeddings it is
        absent). Linear weights are ``(out_features, in_features)``. The dtype is
        format-specific: see the subclass.
        """

    def num_tensors(self) -> int:
        """How many tensors ``tensors()`` yields (for a progress bar)."""
        return len(self.tensor_names())

    @abstractmethod
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The checkpoint's tokenizer, with ``chat_template`` set when the checkpoint has one."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, architecture={self.architecture!r})"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def describe(exc: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line and at most ``limit`` characters, for wrapped errors."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pickle_refusal_message(where: pathlib.Path) -> str:
    return (
        f"{where}: pickle checkpoints (*.bin, *.pt, *.pth, *.ckpt) are refused because loading "
        "them can run arbitrary code. Convert the weights to safetensors (for example load the "
        "model once with transformers in a trusted environment and call "
        "`model.save_pretrained(DIR, safe_serialization=True)`), or use a .gguf file."
    )


# --- checks shared by the formats -------------------------------------------------------------

#: Model types whose tensors ``check_decoder_tensors`` knows, each with the tensors every layer
#: has (the Llama layout, and the Gemma, Phi-3 and GLM-4 variants of it).
_LLAMA_CORE = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_GEMMA2_CORE = (
    *_LLAMA_CORE,
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
)
_LAYER_CORES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_CORE,
    "mistral": _LLAMA_CORE,
    "qwen2": _LLAMA_CORE,
    "qwen3": _LLAMA_CORE,
    "gemma2": _GEMMA2_CORE,
    "gemma3_text": (*_GEMMA2_CORE, "self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    "phi3": (
        "input_layernorm.weight",
        "self_attn.qkv_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_up_proj.weight",
        "mlp.down_proj.weight",
    ),
    "glm4": (
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_self_attn_layernorm.weight",
        "post_attention_layernorm.weight",
        "post_mlp_layernorm.weight",
        "mlp.gate_up_proj.weight",
        "mlp.down_proj.weight",
    ),
}
DECODER_MODEL_TYPES = frozenset(_LAYER_CORES)

_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_finite(path: pathlib.Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse a weight holding NaN or infinity, naming the tensor and the first bad element.

    Refused rather than warned about: one NaN weight turns every logit it reaches into NaN, and
    the engine would then sample garbage with no error, far from the cause. The check is one
    float32 sum per tensor (NaN and infinity always survive a sum); only a tensor whose sum is
    not finite, which huge but finite weights can also give, is searched element by element.
    On the demo model (SmolLM2-135M Q4_1, 134.5M weights, two CPU threads) it costs about
    27 ms, against 0.5-1.2 s to dequantize the weights; a full ``isfinite`` pass costs ~275 ms.
    """
    if tensor.dtype not in _FLOATS or tensor.numel() == 0:
        return
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count == 0:
        return  # the sum overflowed: large but finite weights
    first = tuple(int(i) for i in bad.nonzero()[0])
    value = float(tensor[first])
    raise CheckpointError(
        f"{path}: tensor {name} holds {count} non-finite value{'s' if count > 1 else ''} (NaN "
        f"or infinity; the first is {value} at index {list(first)}). The weights are corrupt: "
        "download or convert the model again."
    )


def check_decoder_tensors(
    path: pathlib.Path,
    config: PretrainedConfig,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    stored_name: Callable[[str], str] = str,
) -> None:
    """Check a decoder's tensors against its config before any weight is read.

    ``shapes`` maps Hugging Face names to shapes in numpy order; ``stored_name`` gives the
    name the file uses (for messages) and ``source`` says where the config came from ("the
    GGUF metadata", "config.json"). Raises ``CheckpointError`` for a tensor of a layer past
    ``num_hidden_layers``, a missing tensor, or a shape the config does not give. Other model
    types are left to their model code.
    """
    if config.model_type not in DECODER_MODEL_TYPES:
        return
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(config.intermediate_size)
    vocab = int(config.vocab_size)
    layers = int(config.num_hidden_layers)
    q, kv = heads * head_dim, kv_heads * head_dim
    globals_ = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    per_layer = {
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "self_attn.q_norm": (head_dim,),
        "self_attn.k_norm": (head_dim,),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
        "pre_feedforward_layernorm": (hidden,),
        "post_feedforward_layernorm": (hidden,),
        "post_self_attn_layernorm": (hidden,),
        "post_mlp_layernorm": (hidden,),
        "self_attn.qkv_proj": (q + 2 * kv, hidden),
        "mlp.gate_up_proj": (2 * inter, hidden),
    }
    sizes = (
        f"vocab_size={vocab}, hidden_size={hidden}, intermediate_size={inter}, "
        f"num_attention_heads={heads}, num_key_value_heads={kv_heads}, head_dim={head_dim}"
    )
    for name, shape in shapes.items():
        expected: tuple[int, ...] | None = globals_.get(name)
        if match := _LAYER_TENSOR.fullmatch(name):
            layer, part, kind = int(match.group(1)), match.group(2), match.group(3)
            if layer >= layers:
                raise CheckpointError(
                    f"{path}: tensor {stored_name(name)} belongs to layer {layer}, but "
                    f"{source} says num_hidden_layers={layers}: the file is corrupt or its "
                    "config does not match its weights."
                )
            full = per_layer.get(part)
            expected = full if full is None or kind == "weight" else full[:1]
        if expected is not None and tuple(shape) != expected:
            raise CheckpointError(
                f"{path}: tensor {stored_name(name)} has shape {list(shape)}, expected "
                f"{list(expected)} from {source} ({sizes}): the file is corrupt or its config "
                "does not match its weights."
            )
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    core = _LAYER_CORES[config.model_type]
    required += [f"model.layers.{i}.{part}" for i in range(layers) for part in core]
    missing = [name for name in required if name not in shapes]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{path}: {len(missing)} tensors are missing: "
            f"{', '.join(stored_name(n) for n in missing[:3])}{more} ({source} says "
            f"num_hidden_layers={layers}): the file is incomplete or corrupt."
        )
