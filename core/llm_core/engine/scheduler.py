"""Scheduler: picks, each step, which sequences run and how many of their tokens.

Continuous batching under a token budget (vLLM v1 style): running sequences first, in order,
then waiting ones in FIFO order; long prompts are split into chunks (chunked prefill) so
prefills and decodes share a step; when KV blocks run out the most recently arrived running
sequence is preempted and later recomputed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from llm_core.engine.block_manager import BlockManager
from llm_core.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    """Limits of one scheduling step.

    ``max_model_len``: most tokens (prompt + output) a sequence may hold. ``max_num_seqs``:
    most sequences running at once. ``max_num_batched_tokens``: most tokens computed in one
    step. ``enable_chunked_prefill``: let a prompt be split over several steps; without it a
    whole prompt must fit in one step's budget, so the budget must cover ``max_model_len``.
    """

    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    #: The model's ``rope_switch_length``: a sequence growing past it is recomputed once.
    recompute_past: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than "
                f"max_model_len ({self.max_model_len}) with chunked prefill off, so long prompts "
                "could never be scheduled; raise max_num_batched_tokens, lower max_model_len "
                "or enable chunked prefill"
            )


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step: compute tokens ``[start, start + num_new_tokens)``.

    ``start`` and ``produces_logits`` are fixed when the step is scheduled, so they stay right
    after :meth:`Scheduler.postprocess` advances the sequence. ``produces_logits`` is True when
    the chunk reaches the end of ``seq.token_ids``: the model's last position in it is sampled.

    ``num_spec`` (speculative decoding): the last ``num_spec`` of the ``num_new_tokens`` are
    proposals, ``seq.spec_token_ids[:num_spec]``, verified this step; each of the last
    ``num_spec + 1`` positions is sampled.
    """

    seq: Sequence
    num_new_tokens: int
    num_spec: int = 0
    start: int = field(init=False)
    produces_logits: bool = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.produces_logits = (
            self.start + self.num_new_tokens - self.num_spec == self.seq.num_tokens
        )

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    def input_ids(self) -> list[int]:
        """The token ids this step computes: the chunk's tokens, then the proposals."""
        ids = self.seq.token_ids[self.start : self.end - self.num_spec]
        return ids + self.seq.spec_token_ids[: self.num_spec] if self.num_spec else ids


@dataclass(slots=True)
class SchedulerOutput:
    """What one step runs.

    ``scheduled``: the sequences to compute, in batch order. ``preempted``: sequences whose KV
    blocks were taken back this step; they wait to be recomputed. ``ignored``: sequences the
    scheduler finished because they can never be served (longer than ``max_model_len`` or than
    the whole KV cache); their status is FINISHED and their blocks are free, and the engine
    should report them finished (reason "length").
    """

    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int
    ignored: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting and running queues and drives the :class:`BlockManager`."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def check_prompt(self, num_tokens: int, reserve: int = 0) -> str | None:
        """Why a prompt of ``num_tokens`` tokens can never be served, or None if it can.

        ``reserve``: generated tokens that must fit as well (the engine passes 1, as
        max_model_len counts at least one generated token). A prompt refused here would
        otherwise be admitted, and dropped only once the scheduler reaches it.
        """
        if num_tokens < 1:
            return "the prompt is empty; give at least one token"
        total = num_tokens + reserve
        plus = f" (plus {reserve} generated)" if reserve else ""
        max_len = self.config.max_model_len
        if total > max_len:
            return (
                f"the prompt has {num_tokens} tokens{plus}, more than max_model_len={max_len}; "
                "shorten the prompt or raise max_model_len (up to the model's context length)"
            )
        bm = self.block_manager
        needed = bm.blocks_needed(total)
        if needed > bm.num_blocks:
            return (
                f"the prompt has {num_tokens} tokens{plus} and needs {needed} KV-cache blocks "
                f"of {bm.block_size} tokens, but the whole KV cache has {bm.num_blocks} blocks "
                f"({bm.num_blocks * bm.block_size} tokens); shorten the prompt to at most "
                f"{bm.num_blocks * bm.block_size - reserve} tokens or give the KV cache more "
                "memory (kv_cache_memory)"
            )
        return None

    def _switch_rope(self, seq: Sequence) -> bool:
        """Drop the KV cache of a sequence that has just grown past ``recompute_past`` (its
        keys were rotated for a short sequence), so this step recomputes all of it; its blocks
        are hashed apart from those of short sequences from then on. True if it did."""
        past = self.config.recompute_past
        if past is None or seq.num_tokens <= past or _is_long(seq):
            return False
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_draft_computed = 0
        _mark_long(seq)
        return True

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` behind every waiting sequence."""
        past = self.config.recompute_past
        if past is not None and seq.num_tokens > past:
            _mark_long(seq)  # computed with the long rope from its first step
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop every sequence of ``request_id``, wherever it is, freeing its blocks at once."""
        aborted = [s for s in self.waiting if s.request_id == request_id]
        aborted += [s for s in self.running if s.request_id == request_id]
        if aborted:
            self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
            self.running = [s for s in self.running if s.request_id != request_id]
            for seq in aborted:
                self._release(seq)
        return aborted

    def finish(self, seq: Sequence) -> None:
        """The engine saw ``seq`` stop: free its blocks at once and drop it from the queues."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self) -> SchedulerOutput:
        """Plan one step within ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences.

        Running sequences go first, in order: 1 token for a decode, the rest of the prompt (up
        to the budget left) for one still in chunked prefill. One that cannot get a block
        preempts the most recently arrived running sequences, itself last. Then, if nothing was
        preempted, waiting sequences are admitted in FIFO order after their prefix-cache hits;
        the first that does not fit stops admission, so none is overtaken.
        """
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        ignored: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._unservable(seq):
                self.running.pop(i)
                self._release(seq)
                ignored.append(seq)
                continue
            if self._switch_rope(seq):
                # Recomputed from scratch: like an admission, after its prefix-cache hits.
                _, num_hit_tokens = bm.get_computed_blocks(seq)
                num_new = min(seq.num_tokens - num_hit_tokens, budget)
            else:
                num_new = min(seq.num_uncomputed_tokens, budget)
            num_spec = self._num_spec(seq, budget)
            if num_spec and bm.can_allocate(seq, 1 + num_spec):
                num_new = 1 + num_spec  # verify the proposals (a multi-token decode)
            else:
                num_spec = 0  # no room for proposals: a plain decode (or a preemption)
            while not bm.can_allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, num_new)
                scheduled.append(ScheduledSeq(seq, num_new, num_spec))
                budget -= num_new
                i += 1

        # After a preemption there are no blocks to spare for newcomers.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if self._unservable(seq):
                self.waiting.popleft()
                self._release(seq)
                ignored.append(seq)
                continue
            _, num_hit_tokens = bm.get_computed_blocks(seq)
            num_new = seq.num_tokens - num_hit_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not bm.can_allocate(seq, num_new):
                break
            bm.allocate(seq, num_new)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        return SchedulerOutput(
            scheduled=scheduled,
            preempted=preempted,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            ignored=ignored,
        )

    def postprocess(self, output: SchedulerOutput, sampled: Mapping[int, int | list[int]]) -> None:
        """Record a finished step: advance each scheduled sequence, append the token(s) sampled
        for each chunk that produced logits (``sampled`` maps seq_id to a token id, or to the
        tokens a verification emitted: its accepted proposals and one more), and offer the
        newly full blocks to the prefix cache. Sequences aborted meanwhile are skipped.

        After a verification, the KV of the accepted proposals counts as computed; the slots
        of rejected ones lie past ``num_computed_tokens`` and are overwritten later."""
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.spec_token_ids = []
            seq.num_computed_tokens = item.end - item.num_spec
            if item.produces_logits:
                if seq.seq_id not in sampled:
                    raise KeyError(
                        f"no sampled token for {seq!r}, whose chunk produced logits this step"
                    )
                got = sampled[seq.seq_id]
                tokens = [got] if isinstance(got, int) else got
                if not 1 <= len(tokens) <= item.num_spec + 1:
                    raise ValueError(
                        f"{len(tokens)} tokens for {seq!r}, which verified {item.num_spec} "
                        "proposals"
                    )
                seq.num_computed_tokens += len(tokens) - 1  # the accepted proposals
                for token in tokens:
                    seq.append_token(token)
            self.block_manager.commit(seq)

    # ---- internals ----------------------------------------------------------------------

    def _num_spec(self, seq: Sequence, budget: int) -> int:
        """How many of a decoding sequence's proposals this step can verify: within the token
        budget, and none that would pass max_model_len or the sequence's max_tokens (a
        verification emits up to one token more than it verifies)."""
        if not seq.spec_token_ids or seq.num_uncomputed_tokens != 1:
            return 0
        room = min(
            self.config.max_model_len - seq.num_tokens,
            seq.max_tokens - seq.num_output_tokens,
        )
        num_spec = min(len(seq.spec_token_ids), budget - 1, room - 1)
        past = self.config.recompute_past
        if past is not None and seq.num_tokens <= past:
            # Rows of a verification are decodes of lengths num_tokens .. num_tokens + k':
            # none may pass the rope switch, which recomputes the sequence first.
            num_spec = min(num_spec, past - seq.num_tokens)
        return max(0, num_spec)

    def _unservable(self, seq: Sequence) -> bool:
        """Whether computing all of ``seq`` needs more positions or blocks than exist at all."""
        bm = self.block_manager
        return (
            seq.num_tokens > self.config.max_model_len
            or bm.blocks_needed(seq.num_tokens) > bm.num_blocks
        )

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first, to be recomputed from scratch (its
        generated tokens are kept and re-prefilled with the prompt)."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED


_LONG_SALT = "rope:long"


def _is_long(seq: Sequence) -> bool:
    return (seq.cache_salt or "").endswith(_LONG_SALT)


def _mark_long(seq: Sequence) -> None:
    """Salt the sequence's block hashes: a block's keys depend on the rope it was rotated with."""
    seq.cache_salt = f"{seq.cache_salt or ''}|{_LONG_SALT}"
    seq.block_hashes = []
