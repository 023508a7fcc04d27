"""Per-step metadata that the engine builds on the host and hands to attention and sampling ops.

The engine fills these with numpy arrays once per forward step; every layer reuses the same
object. A backend converts the arrays it needs to device tensors once and keeps them in
``device_cache`` (keyed by its own name), so the copy is paid once per step, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's tokens live in the paged KV cache.

    A step processes ``B`` sequences with ``T = query_start_loc[-1]`` new tokens in total. The
    new tokens of sequence ``b`` are rows ``query_start_loc[b]:query_start_loc[b+1]`` of the
    step's activations; they are the *last* ``q_len_b`` tokens of its context, whose full
    length (cached tokens plus new ones) is ``seq_lens[b]``. So the new token ``i`` of sequence
    ``b`` has position ``seq_lens[b] - q_len_b + i`` and attends causally to positions
    ``0 .. seq_lens[b] - q_len_b + i``.

    Token at position ``p`` of sequence ``b`` is stored in cache block
    ``block_tables[b, p // block_size]`` at offset ``p % block_size``. ``slot_mapping[t]`` is
    the flat slot (``block * block_size + offset``) where new token ``t`` is written, or -1 for
    a padding token that must not be written.
    """

    query_start_loc: np.ndarray  # (B+1,) int32, starts at 0, non-decreasing
    seq_lens: np.ndarray  # (B,) int32, >= query lengths
    block_tables: np.ndarray  # (B, max_blocks_per_seq) int32; entries past a sequence's need: any
    slot_mapping: np.ndarray  # (T,) int64
    block_size: int
    device_cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.query_start_loc = np.ascontiguousarray(self.query_start_loc, dtype=np.int32)
        self.seq_lens = np.ascontiguousarray(self.seq_lens, dtype=np.int32)
        self.block_tables = np.ascontiguousarray(self.block_tables, dtype=np.int32)
        self.slot_mapping = np.ascontiguousarray(self.slot_mapping, dtype=np.int64)
        if self.block_tables.ndim != 2:
            raise ValueError("block_tables must be 2-D (num_seqs, max_blocks_per_seq)")
        b = len(self.seq_lens)
        if self.query_start_loc.shape != (b + 1,) or self.block_tables.shape[0] != b:
            raise ValueError(
                f"inconsistent batch: {b} seq_lens, {len(self.query_start_loc)} query_start_loc, "
                f"{self.block_tables.shape[0]} block_tables rows"
            )
        if np.any(self.query_lens > self.seq_lens):
            raise ValueError("a sequence has more new tokens than its total length")

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens.max()) if self.num_seqs else 0

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max()) if self.num_seqs else 0

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one new token: the paged_attention_decode case."""
        return self.num_seqs > 0 and bool(np.all(self.query_lens == 1))

    def require_decode(self) -> None:
        """Raise unless :attr:`is_decode`: what every backend's ``paged_attention_decode``
        checks first. The answer is kept in ``device_cache`` (cleared whenever the metadata is
        updated in place), so the layers of a step after the first pay nothing."""
        if not self.device_cache.get("is_decode"):
            if not self.is_decode:
                raise ValueError("paged_attention_decode needs exactly one new token per sequence")
            self.device_cache["is_decode"] = True


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling settings for a ``(B, V)`` logits tensor. Neutral values disable a filter.

    Order of application in ``sample``: temperature, top-k, top-p, min-p, then a draw.
    A row with ``temperature == 0`` is greedy (argmax of the logits, ties to the lowest id) and
    ignores the filters. The random draw of row ``b`` depends only on ``seeds[b]`` and the row's
    probabilities, never on the other rows of the batch.
    """

    temperature: np.ndarray  # (B,) float32, >= 0
    top_k: np.ndarray  # (B,) int32, 0 = off
    top_p: np.ndarray  # (B,) float32 in (0, 1], 1 = off
    min_p: np.ndarray  # (B,) float32 in [0, 1], 0 = off
    seeds: np.ndarray  # (B,) int64, the row's random stream for this draw
    device_cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.temperature = np.ascontiguousarray(self.temperature, dtype=np.float32)
        self.top_k = np.ascontiguousarray(self.top_k, dtype=np.int32)
        self.top_p = np.ascontiguousarray(self.top_p, dtype=np.float32)
        self.min_p = np.ascontiguousarray(self.min_p, dtype=np.float32)
        self.seeds = np.ascontiguousarray(self.seeds, dtype=np.int64)
        b = len(self.temperature)
        for name in ("top_k", "top_p", "min_p", "seeds"):
            if len(getattr(self, name)) != b:
                raise ValueError(f"SamplingMetadata.{name} must have {b} rows")

    @property
    def num_rows(self) -> int:
        return len(self.temperature)

    @property
    def all_greedy(self) -> bool:
        return bool(np.all(self.temperature == 0))


@dataclass(slots=True)
class PenaltyMetadata:
    """Per-row penalties (vLLM semantics) and the token ids they look at.

    ``prompt_ids`` and ``output_ids`` are right-padded with -1. Repetition penalty ``r`` applies
    to every token seen in the prompt or the output: a positive logit is divided by ``r``, a
    negative one multiplied. Frequency penalty ``f`` subtracts ``f * count`` and presence penalty
    ``p`` subtracts ``p * (count > 0)``, counting output tokens only.
    """

    prompt_ids: np.ndarray  # (B, Lp) int64, pad -1
    output_ids: np.ndarray  # (B, Lo) int64, pad -1
    presence: np.ndarray  # (B,) float32, 0 = off
    frequency: np.ndarray  # (B,) float32, 0 = off
    repetition: np.ndarray  # (B,) float32, 1 = off
    device_cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_ids = np.ascontiguousarray(self.prompt_ids, dtype=np.int64).reshape(
            len(self.presence), -1
        )
        self.output_ids = np.ascontiguousarray(self.output_ids, dtype=np.int64).reshape(
            len(self.presence), -1
        )
        self.presence = np.ascontiguousarray(self.presence, dtype=np.float32)
        self.frequency = np.ascontiguousarray(self.frequency, dtype=np.float32)
        self.repetition = np.ascontiguousarray(self.repetition, dtype=np.float32)
