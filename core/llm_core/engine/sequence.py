"""Sequence: one generation stream (prompt + tokens generated so far) and its KV-cache state."""

from __future__ import annotations

import enum
import itertools
import time

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life.

    A preempted sequence goes back to WAITING (its KV blocks freed, to be recomputed); its
    ``num_preemptions`` counter tells it apart from a fresh one.
    """

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """The host-side state of one sequence.

    ``token_ids`` holds the prompt followed by every generated token; it only ever grows, by
    :meth:`append_token`. ``num_computed_tokens`` counts the leading tokens whose KV is in the
    cache (prefix-cache hits included); tokens ``[num_computed_tokens, num_tokens)`` still have
    to go through the model. ``block_table`` lists the physical KV blocks holding tokens
    ``[0, len(block_table) * block_size)`` in order.

    ``cache_salt`` is mixed into every block hash, so sequences run under different adapters or
    model configurations never share KV blocks. ``block_hashes`` and ``num_committed_blocks``
    belong to the :class:`~llm_core.engine.block_manager.BlockManager`: the chained hashes of
    the full blocks of ``token_ids`` (computed lazily, valid because tokens are only appended),
    and how many leading blocks of ``block_table`` it has already offered to the prefix cache.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        max_tokens: int,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(
                f"request {request_id!r}: the prompt is empty; give at least one token"
            )
        if max_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_tokens must be >= 1, got {max_tokens}")
        self.seq_id: int = next(_seq_ids)
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.max_tokens = max_tokens
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.cache_salt = cache_salt
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_committed_blocks = 0
        #: Take no prefix-cache hits: every prompt position is computed (prompt logprobs).
        self.skip_prefix_cache = False
        #: Speculative decoding: the tokens proposed to follow ``token_ids`` (not part of
        #: them until the target's verification accepts them), and how many leading tokens
        #: have KV in the draft model's cache (reset with ``num_computed_tokens``).
        self.spec_token_ids: list[int] = []
        self.num_draft_computed = 0

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def drop_last_tokens(self, n: int) -> None:
        """Forget the last ``n`` tokens of a sequence that finished within a step that emitted
        several (speculative decoding): the tokens after its stop were never output."""
        if n:
            if not 0 < n <= self.num_output_tokens:
                raise ValueError(f"cannot drop {n} tokens of {self!r}")
            del self.token_ids[-n:]
            self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens - 1)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, "
            f"status={self.status.name}, tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
