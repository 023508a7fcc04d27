"""The checkpoint contract every model format implements (``open_checkpoint`` in
:mod:`llm_core.loaders.opener` picks one).

A checkpoint is read-only, host-side and lazy: opening it reads the config and the tensor
index; ``tensors()`` streams the weights one at a time so a model never needs two copies in
memory. Pickle files (``*.bin``, ``*.pt``) are never loaded, and nothing is ever downloaded
from a model hub.
"""

from __future__ import annotations

import pathlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


class CheckpointError(ValueError):
    """A checkpoint cannot be opened or read. The message says what was wrong and what to do."""


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


def pickle_refusal_message(where: pathlib.Path) -> str:
    return (
        f"{where}: pickle checkpoints (*.bin, *.pt, *.pth, *.ckpt) are refused because loading "
        "them can run arbitrary code. Convert the weights to safetensors (for example load the "
        "model once with transformers in a trusted environment and call "
        "`model.save_pretrained(DIR, safe_serialization=True)`), or use a .gguf file."
    )
