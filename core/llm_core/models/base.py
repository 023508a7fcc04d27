"""What every model family provides to the engine: shapes for the KV cache, weight loading and a
forward pass written only in HAL operators."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from llm_hal import AttentionMetadata, Backend, DType, LinearWeight, Tensor


@dataclass(slots=True)
class ForwardBatch:
    """One step's inputs, already on the device (except the host-side metadata)."""

    input_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    attn: AttentionMetadata
    logits_indices: Tensor  # (B',) int64: rows of the step whose logits are needed


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

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Run the step; returns fp32 logits (B', V) for ``batch.logits_indices``."""
        raise NotImplementedError

    # helpers for subclasses ----------------------------------------------------------------
    def upload(self, host: torch.Tensor, dtype: DType | None = None) -> Tensor:
        return self.backend.from_host(host.contiguous(), dtype or self.dtype)

    def upload_linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearWeight:
        b = None if bias is None else self.upload(bias)
        return self.backend.prepare_linear(self.upload(weight), b)
