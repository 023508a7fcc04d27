"""The device copy of a step's attention metadata, made once per step and shared by layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from llm_hal import AttentionMetadata


@dataclass(slots=True)
class AttentionInputs:
    """What the attention and cache kernels read, on the device.

    ``max_seq_len`` and ``max_query_len`` need only be upper bounds: they size grids and the
    split of decode, never what is read. A CUDA graph relies on this: it fills these tensors
    in place before each replay and keeps the bounds of the largest step it was made for.
    """

    query_start_loc: torch.Tensor  # (B+1,) int32
    seq_lens: torch.Tensor  # (B,) int32
    block_tables: torch.Tensor  # (B, M) int32
    slot_mapping: torch.Tensor  # (T,) int64
    max_query_len: int
    max_seq_len: int

    @classmethod
    def upload(cls, meta: AttentionMetadata, device: torch.device) -> AttentionInputs:
        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        return cls(
            query_start_loc=dev(meta.query_start_loc),
            seq_lens=dev(meta.seq_lens),
            block_tables=dev(meta.block_tables),
            slot_mapping=dev(meta.slot_mapping),
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
        )

    def copy_from(self, meta: AttentionMetadata) -> None:
        """Refill these tensors in place with ``meta``'s current host arrays (queued on the
        current stream); the shapes must be the ones they were made with."""
        for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
            dst: torch.Tensor = getattr(self, name)
            src = np.asarray(getattr(meta, name))
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"the step was recorded with {name} of shape {tuple(dst.shape)} and is "
                    f"replayed with {tuple(src.shape)}: update the metadata in place"
                )
            dst.copy_(torch.from_numpy(src), non_blocking=True)
