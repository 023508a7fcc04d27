"""What every model family provides to the engine: shapes for the KV cache, weight loading and a
forward pass written only in HAL operators."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from llm_hal import AttentionMetadata, Backend, DType, LinearWeight, Tensor


@dataclass(slots=True)
class ForwardBatch:
    """One step's inputs, already on the device (except the host-side metadata)."""

    input_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    attn: AttentionMetadata
    logits_indices: Tensor  # (B',) int64: rows of the step whose logits are needed
    #: (T,) int64: the rotary-table row each token reads (``CausalLM.rope_rows``); the
    #: ``positions`` tensor itself where those rows are the positions.
    rope_positions: Tensor


class UnsupportedDTypeError(ValueError):
    """The model cannot be served correctly in the requested dtype (the message says why and
    which dtypes to use instead)."""


class CausalLM:
    """Base of every architecture. Subclasses declare the HF architecture names they serve."""

    #: Hugging Face ``config.architectures`` strings this class serves.
    architectures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, backend: Backend, dtype: DType):
        self.config = config
        self.backend = backend
        self.dtype = dtype

    # KV-cache geometry ---------------------------------------------------------------------
    num_layers: int
    num_kv_heads: int
    head_size: int
    vocab_size: int
    max_position: int

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Consume (HF name, host tensor) pairs; returns the bytes placed on the device."""
        raise NotImplementedError

    #: A sequence whose length passes this many tokens is recomputed whole (the scheduler
    #: drops its KV cache once, at the crossing) and from then on rotated with other
    #: frequencies: transformers' LongRoPE semantics for Phi-3 (None: never).
    rope_switch_length: int | None = None

    def rope_rows(self, positions: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """The rotary-table row of each token of a step (int64, like ``positions``), from its
        position and the length of its sequence (``seq_lens``, one per token: every token the
        sequence holds at this step, the ones still to compute included). The engine puts the
        result in ``ForwardBatch.rope_positions``; returning ``positions`` itself (this
        default) tells it the rows are the positions, and it reuses the positions tensor.
        Overridden by models whose rotary frequencies depend on the sequence length (LongRoPE:
        see :meth:`llm_core.models.rope.RopeTable.rows` and ``rope_switch_length``)."""
        return positions

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Run the step; returns fp32 logits (B', V) for ``batch.logits_indices``."""
        raise NotImplementedError

    # helpers for subclasses ----------------------------------------------------------------
    def upload(self, host: torch.Tensor, dtype: DType | None = None) -> Tensor:
        return self.backend.from_host(host.contiguous(), dtype or self.dtype)

    def upload_linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearWeight:
        b = None if bias is None else self.upload(bias)
        return self.backend.prepare_linear(self.upload(weight), b)
