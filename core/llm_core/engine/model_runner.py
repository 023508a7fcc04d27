"""ModelRunner: turns a scheduled step into HAL inputs, runs the model and samples.

Everything here is host bookkeeping (numpy) plus calls of HAL operators: the step's token ids,
positions, slot mapping and block tables are built on the host once per step; the forward
pass, logits processing, sampling and logprobs run on the backend.

Decode steps (one new token per sequence) of up to ``MAX_CAPTURE_BATCH`` sequences run as a
captured graph where the backend offers one (``Backend.capture_graph``): the batch is padded to
a capture size, its inputs live in persistent buffers updated in place, and the whole forward
pass replays as one backend call. At small batches the per-operator host work of an eager
step costs as much as the arithmetic, so this is most of the batch-1 decode speed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from llm_hal import AttentionMetadata, Backend, DType, PenaltyMetadata, SamplingMetadata, Tensor
from llm_hal.backend import CapturedGraph

from llm_core.engine.grammar_compiler import GrammarCompiler, bitmask_words, fill_bitmask
from llm_core.engine.scheduler import SchedulerOutput
from llm_core.engine.sequence import Sequence
from llm_core.engine.speculative import accept_draws
from llm_core.models.base import CausalLM, ForwardBatch
from llm_core.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
log = logging.getLogger("llm_core.engine")

#: Set to 1 to never capture decode steps (vLLM's ``enforce_eager``).
ENV_ENFORCE_EAGER = "LLM_CORE_ENFORCE_EAGER"
#: Batch sizes decode graphs are captured for; a decode batch runs in the smallest that fits.
CAPTURE_SIZES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40, 48, 56, 64)
MAX_CAPTURE_BATCH = CAPTURE_SIZES[-1]


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for draw number ``step`` of a request seeded with ``seed``
    (splitmix64), so a seeded request draws the same numbers whatever batch it is in."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the sampled token, from the raw logits
    rank: int | None = None
    top: list[tuple[int, float]] | None = None  # the top-k (id, logprob), descending


@dataclass(slots=True)
class SeqSampling:
    """What sampling needs to know about one sequence besides its tokens."""

    params: SamplingParams
    seed: int  # base seed of the request (its own, or one drawn by the engine)
    banned: list[int]  # token ids that may not be drawn yet (EOS before min_tokens)
    #: Top log-probabilities to report per prompt position (None: no prompt logprobs; the
    #: engine asks for them on one completion of a request only).
    prompt_logprobs: int | None = None
    #: Prompt positions whose next-token log-probabilities were reported: a recomputed
    #: prefill (after preemption) does not report them again.
    prompt_logprobs_done: int = 0
    #: Guided decoding: the llguidance matcher of what this sequence generated so far (None:
    #: unconstrained); it gives the allowed next tokens before each sampling step.
    matcher: Any = None


@dataclass(slots=True)
class StepResult:
    """What one step gives back: the sampled token(s) of every sequence whose chunk produced
    logits (one, or after a speculative verification its accepted proposals and one more), and
    for sequences that asked for them the log-probabilities of the prompt tokens the step's
    chunk predicted (``token_id`` is the prompt token), in prompt order. ``proposed`` and
    ``accepted`` count the proposals verified and accepted this step, per sequence."""

    sampled: dict[int, list[SampledToken]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[SampledToken]] = field(default_factory=dict)
    proposed: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Row:
    """One sampled logits row: ``seq``'s next token after its tokens and ``proposals``, the
    speculative proposals before this row (empty outside a verification)."""

    seq: Sequence
    proposals: list[int]


#: Prompt rows whose log-probabilities are computed at once: bounds the (rows, vocab)
#: temporaries of a long prefill chunk.
PROMPT_LOGPROB_ROWS = 256


@dataclass(slots=True)
class _PromptRows:
    """Logits rows of one sequence's chunk whose next tokens are prompt tokens."""

    seq_id: int
    targets: list[int]  # the prompt tokens those rows predict
    info: SeqSampling
    done: int  # info.prompt_logprobs_done once these are reported


@dataclass(slots=True)
class _DecodeGraph:
    """The persistent inputs of one capture size and, once captured, its graph.

    Rows past the step's real batch are padding: token 0 at position 0 of a 1-token prompt,
    slot -1 (no cache write), length 1 over block 0; their logits are computed and dropped.
    ``batch.rope_positions`` is ``batch.positions`` itself while the model's rotary rows are
    its positions, else a buffer of its own refreshed from ``model.rope_rows`` every step.
    """

    size: int
    ids: np.ndarray  # (size,) int64, host staging of batch.input_ids
    positions: np.ndarray  # (size,) int64, host staging of batch.positions
    seq_lens: np.ndarray  # (size,) int64, each row's sequence length (all its known tokens)
    batch: ForwardBatch
    graph: CapturedGraph | None = None
    logits: Tensor | None = None  # (size, V) fp32, rewritten by every replay
    tried: bool = False  # capture attempted (graph None afterwards: not capturable)
    first_rows: dict[int, Tensor] = field(default_factory=dict)  # n -> arange(n) on device


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        backend: Backend,
        kv_caches: list[tuple[Tensor, Tensor]],
        block_size: int,
        capture: bool | None = None,
        grammar: GrammarCompiler | None = None,
        max_positions: int | None = None,
    ):
        """``max_positions``: the longest sequence the block tables it is given can describe
        (the model's own context by default; a draft model reads the target's tables)."""
        self.model = model
        self.max_positions = max(model.max_position, max_positions or 0)
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.grammar = grammar
        #: Time spent restricting logits to grammars (masks computed, uploaded, applied), and
        #: in how many steps: what guided decoding adds to a step (``llm-core bench``).
        self.guided_seconds = 0.0
        self.guided_steps = 0
        if capture is None:
            capture = os.environ.get(ENV_ENFORCE_EAGER, "0").strip().lower() in ("", "0", "false")
        self.capture = capture
        self._graphs: dict[int, _DecodeGraph] = {}

    def execute(self, output: SchedulerOutput, sampling: dict[int, SeqSampling]) -> StepResult:
        """Run one step: sample a token for every sequence whose chunk produced logits and
        compute the prompt log-probabilities that were asked for (both keyed by seq_id)."""
        prompt_rows: list[_PromptRows] = []
        if self.capture and _is_decode(output) and len(output.scheduled) <= MAX_CAPTURE_BATCH:
            logits, rows = self._run_decode_graph(output)
        else:
            batch, rows, prompt_rows = self._prepare(output, sampling)
            logits = self.model.forward(batch, self.kv_caches)  # (B' + P, V) fp32
        result = StepResult()
        be = self.backend
        if prompt_rows:
            n = len(rows)
            result.prompt_logprobs = self._prompt_logprobs(logits, n, prompt_rows)
            if n:
                first = be.from_host(np.arange(n, dtype=np.int64), DType.INT64)
                logits = be.gather_rows(logits, first)
        if rows:
            draws = self._sample(logits, rows, sampling)
            result.sampled = _verify(rows, draws)
            result.proposed = {
                item.seq.seq_id: item.num_spec for item in output.scheduled if item.num_spec
            }
        return result

    # ------------------------------------------------------------------------------------------
    # captured decode
    # ------------------------------------------------------------------------------------------

    def _run_decode_graph(self, output: SchedulerOutput) -> tuple[Tensor, list[_Row]]:
        rows = [_Row(item.seq, []) for item in output.scheduled]
        size = next(s for s in CAPTURE_SIZES if s >= len(rows))
        g = self._graphs.get(size) or self._new_decode_graph(size)
        try:
            return self._decode_in(g, output), rows
        except BaseException:
            # The step failed part way: the graph may be half recorded, its logits stale and
            # its buffers half updated. Drop it; the next decode of this size starts afresh.
            self._graphs.pop(size, None)
            raise

    def _decode_in(self, g: _DecodeGraph, output: SchedulerOutput) -> Tensor:
        """Run the decode step ``output`` in ``g``'s buffers: replay its graph, or record it
        on first use; the logits of the step's sequences, in batch order."""
        n, size = len(output.scheduled), g.size
        attn, bs = g.batch.attn, self.block_size
        tables = attn.block_tables
        for row, item in enumerate(output.scheduled):
            seq, pos = item.seq, item.start
            table = seq.block_table
            g.ids[row] = seq.token_ids[pos]
            g.positions[row] = pos
            g.seq_lens[row] = seq.num_tokens
            attn.seq_lens[row] = pos + 1
            attn.slot_mapping[row] = table[pos // bs] * bs + pos % bs
            tables[row, : len(table)] = table
        # Padding rows (a smaller batch may follow a larger one in the same graph).
        g.ids[n:] = 0
        g.positions[n:] = 0
        g.seq_lens[n:] = 1
        attn.seq_lens[n:] = 1
        attn.slot_mapping[n:] = -1
        tables[n:, 0] = 0
        # The metadata object is reused across steps: device copies a backend cached from it
        # describe the previous step (a recorded graph reads the host arrays themselves).
        attn.device_cache.clear()
        be = self.backend
        be.copy_(g.batch.input_ids, be.from_host(g.ids, DType.INT64))
        be.copy_(g.batch.positions, be.from_host(g.positions, DType.INT64))
        self._stage_rope_rows(g)
        if g.graph is not None:
            g.graph.replay()  # rewrites g.logits (or, emulated, sets it anew)
            logits = g.logits
        elif not g.tried:
            g.tried = True

            def step() -> None:  # the backend may call it more than once while recording
                g.logits = self.model.forward(g.batch, self.kv_caches)

            g.graph = be.capture_graph(step)
            logits = g.logits
            if g.graph is None:
                log.info("decode batch %d runs eagerly: the backend did not capture it", size)
        else:
            logits = self.model.forward(g.batch, self.kv_caches)
        if n < size:
            rows = g.first_rows.get(n)
            if rows is None:
                rows = g.first_rows[n] = be.from_host(np.arange(n, dtype=np.int64), DType.INT64)
            logits = be.gather_rows(logits, rows)
        return logits

    def _new_decode_graph(self, size: int) -> _DecodeGraph:
        be = self.backend
        width = -(-self.max_positions // self.block_size)
        attn = AttentionMetadata(
            query_start_loc=np.arange(size + 1, dtype=np.int32),
            seq_lens=np.ones(size, dtype=np.int32),
            block_tables=np.zeros((size, width), dtype=np.int32),
            slot_mapping=np.full(size, -1, dtype=np.int64),
            block_size=self.block_size,
        )
        zeros = np.zeros(size, dtype=np.int64)
        positions = be.from_host(zeros, DType.INT64)
        batch = ForwardBatch(
            input_ids=be.from_host(zeros, DType.INT64),
            positions=positions,
            attn=attn,
            logits_indices=be.from_host(np.arange(size, dtype=np.int64), DType.INT64),
            rope_positions=positions,
        )
        g = _DecodeGraph(size, zeros.copy(), zeros.copy(), np.ones(size, dtype=np.int64), batch)
        rows = self._rope_rows(g.positions, g.seq_lens)
        if rows is not g.positions:
            batch.rope_positions = be.from_host(rows, DType.INT64)
        self._graphs[size] = g
        return g

    def _stage_rope_rows(self, g: _DecodeGraph) -> None:
        """Refresh ``g.batch.rope_positions`` for the rows staged in ``g`` (after its
        positions). A graph recorded reading the positions tensor as its rotary rows is
        dropped, and recorded anew with a buffer of its own, once the model's rows stop being
        the positions."""
        be, batch = self.backend, g.batch
        rows = self._rope_rows(g.positions, g.seq_lens)
        if rows is g.positions:
            if batch.rope_positions is not batch.positions:
                be.copy_(batch.rope_positions, batch.positions)
        elif batch.rope_positions is batch.positions:
            batch.rope_positions = be.from_host(rows, DType.INT64)
            g.graph, g.logits, g.tried = None, None, False
        else:
            be.copy_(batch.rope_positions, be.from_host(rows, DType.INT64))

    def _rope_rows(self, positions: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """The model's rotary-table rows for the tokens (``positions`` itself: identity)."""
        rows = self.model.rope_rows(positions, seq_lens)
        if rows is not positions and np.shape(rows) != positions.shape:
            raise ValueError(
                f"{type(self.model).__name__}.rope_rows returned shape {np.shape(rows)} for "
                f"{positions.shape[0]} tokens"
            )
        return rows

    # ------------------------------------------------------------------------------------------
    # eager steps
    # ------------------------------------------------------------------------------------------

    def _prepare(
        self, output: SchedulerOutput, sampling: dict[int, SeqSampling]
    ) -> tuple[ForwardBatch, list[_Row], list[_PromptRows]]:
        """The step's inputs. Its logits rows: one per sampled sequence (one per verified
        proposal more in a speculative verification), in batch order, then the rows of the
        prompt positions whose log-probabilities were asked for."""
        ids: list[int] = []
        positions: list[np.ndarray] = []
        known_lens: list[np.ndarray] = []  # the sequence length each row belongs to
        slots: list[np.ndarray] = []
        starts = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        sampled: list[_Row] = []
        prompt: list[_PromptRows] = []
        prompt_positions: list[int] = []
        max_blocks = max(len(s.seq.block_table) for s in output.scheduled)
        tables = np.zeros((len(output.scheduled), max_blocks), dtype=np.int32)
        for row, item in enumerate(output.scheduled):
            seq, start, end = item.seq, item.start, item.end
            ids.extend(item.input_ids())
            pos = np.arange(start, end, dtype=np.int64)
            table = np.asarray(seq.block_table, dtype=np.int64)
            positions.append(pos)
            # A verification's rows are decodes of growing sequences (for length-switched
            # rope tables); any other chunk's rows belong to a sequence of num_tokens.
            known_lens.append(pos + 1 if item.num_spec else np.full_like(pos, seq.num_tokens))
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            tables[row, : len(table)] = table
            starts.append(starts[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.produces_logits:  # the chunk reaches the last token: sample the next
                proposals = seq.spec_token_ids[: item.num_spec]
                for i in range(item.num_spec + 1):
                    logits_rows.append(starts[-1] - 1 - item.num_spec + i)
                    sampled.append(_Row(seq, proposals[:i]))
            info = sampling[seq.seq_id]
            if info.prompt_logprobs is not None:
                # Position p's logits predict token p + 1: prompt tokens for p < prompt - 1.
                first = max(start, info.prompt_logprobs_done)
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    base = starts[-2] - start
                    prompt_positions.extend(range(base + first, base + last))
                    targets = seq.token_ids[first + 1 : last + 1]
                    prompt.append(_PromptRows(seq.seq_id, targets, info, last))
        logits_rows.extend(prompt_positions)
        be = self.backend
        attn = AttentionMetadata(
            query_start_loc=np.asarray(starts),
            seq_lens=np.asarray(seq_lens),
            block_tables=tables,
            slot_mapping=np.concatenate(slots),
            block_size=self.block_size,
        )
        host_positions = np.concatenate(positions)
        device_positions = be.from_host(host_positions, DType.INT64)
        rows = self._rope_rows(host_positions, np.concatenate(known_lens))
        batch = ForwardBatch(
            input_ids=be.from_host(np.asarray(ids, dtype=np.int64), DType.INT64),
            positions=device_positions,
            attn=attn,
            logits_indices=be.from_host(np.asarray(logits_rows, dtype=np.int64), DType.INT64),
            rope_positions=(
                device_positions if rows is host_positions else be.from_host(rows, DType.INT64)
            ),
        )
        return batch, sampled, prompt

    def _prompt_logprobs(
        self, logits: Tensor, first_row: int, rows: list[_PromptRows]
    ) -> dict[int, list[SampledToken]]:
        """Raw log-probabilities of the prompt tokens (and the top ones) from logits rows
        ``first_row`` on, ``PROMPT_LOGPROB_ROWS`` rows at a time."""
        be = self.backend
        targets = [t for r in rows for t in r.targets]
        owners = [(r, j) for r in rows for j in range(len(r.targets))]
        out: dict[int, list[SampledToken]] = {r.seq_id: [] for r in rows}
        for lo in range(0, len(targets), PROMPT_LOGPROB_ROWS):
            hi = min(lo + PROMPT_LOGPROB_ROWS, len(targets))
            whole = first_row == 0 and lo == 0 and hi == be.shape(logits)[0]
            part = logits
            if not whole:
                picked = np.arange(first_row + lo, first_row + hi, dtype=np.int64)
                part = be.gather_rows(logits, be.from_host(picked, DType.INT64))
            ids = be.from_host(np.asarray(targets[lo:hi], dtype=np.int64), DType.INT64)
            tops = [r.info.prompt_logprobs or 0 for r, _ in owners[lo:hi]]
            scored = self._logprobs_of(part, ids, targets[lo:hi], tops)
            for (r, _), token in zip(owners[lo:hi], scored, strict=True):
                out[r.seq_id].append(token)
        for r in rows:  # reported: a recomputed prefill will not report these again
            r.info.prompt_logprobs_done = r.done
        return out

    def _sample(
        self, logits: Tensor, rows: list[_Row], sampling: dict[int, SeqSampling]
    ) -> list[SampledToken]:
        """A draw from every row's distribution: the sequence's sampling parameters, its
        penalties over the tokens before the row, its min_tokens bans and grammar, and the
        seed of the row's output index (so a row of a verification draws what a plain decode
        of the same token would)."""
        be = self.backend
        infos = [sampling[r.seq.seq_id] for r in rows]
        params = [i.params for i in infos]
        # Output index of each row's token: the sequence's next, plus the proposals before.
        index = [r.seq.num_output_tokens + len(r.proposals) for r in rows]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logits = logits
        penalize = any(
            p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params
        )
        bans = [i.banned if n < i.params.min_tokens else [] for i, n in zip(infos, index)]
        ban = any(bans)
        guided = [(i.matcher, row) for row, i in enumerate(infos) if i.matcher is not None]
        assert all(not rows[row].proposals for _, row in guided), "no proposals when guided"
        if want_logprobs and (penalize or ban or guided):
            # vLLM reports log-probabilities of the raw model output: keep a copy.
            raw_logits = be.copy_(be.empty(be.shape(logits), DType.FP32), logits)
        if penalize:
            be.apply_penalties(logits, _penalty_meta(rows, params))
        if ban:
            banned = _pad_rows(bans)
            be.apply_token_bans(logits, be.from_host(banned, DType.INT64))
        if guided:
            start = time.perf_counter()
            mask = be.from_host(self._bitmask(guided, len(infos)), DType.INT32)
            be.apply_token_bitmask(logits, mask)
            self.guided_seconds += time.perf_counter() - start
            self.guided_steps += 1
        meta = SamplingMetadata(
            temperature=np.array([p.temperature for p in params]),
            top_k=np.array([p.top_k for p in params]),
            top_p=np.array([p.top_p for p in params]),
            min_p=np.array([p.min_p for p in params]),
            seeds=np.array([step_seed(i.seed, n) for i, n in zip(infos, index)]),
        )
        tokens_dev = be.sample(logits, meta)
        tokens = be.to_host(tokens_dev).tolist()
        results = [SampledToken(int(t)) for t in tokens]
        if want_logprobs:
            tops = [p.logprobs or 0 for p in params]
            scored = self._logprobs_of(raw_logits, tokens_dev, tokens, tops)
            for row, (p, token) in enumerate(zip(params, scored, strict=True)):
                if p.logprobs is not None:
                    results[row] = token
        return results

    def _bitmask(self, guided: list[tuple[Any, int]], rows: int) -> np.ndarray:
        """The allowed next tokens of every row: the matchers' masks, all ones elsewhere."""
        assert self.grammar is not None, "guided rows come with the engine's compiler"
        vocab = self.model.vocab_size
        mask = np.full((rows, bitmask_words(vocab)), -1, dtype=np.int32)
        fill_bitmask(mask, guided, self.grammar)
        return mask

    def _logprobs_of(
        self, logits: Tensor, ids: Tensor, host_ids: list[int], tops: list[int]
    ) -> list[SampledToken]:
        """Row ``i``'s token ``host_ids[i]`` (``ids`` on the device) with its raw
        log-probability, its rank and the ``tops[i]`` most likely tokens."""
        be = self.backend
        lp = be.compute_logprobs(logits, ids, max(tops))
        token_lp = be.to_host(lp.token_logprobs).tolist()
        ranks = be.to_host(lp.token_ranks).tolist()
        top_lp = be.to_host(lp.top_logprobs).tolist()
        top_ids = be.to_host(lp.top_ids).tolist()
        return [
            SampledToken(
                int(t),
                float(token_lp[i]),
                int(ranks[i]),
                [(int(a), float(b)) for a, b in zip(top_ids[i][:k], top_lp[i][:k])],
            )
            for i, (t, k) in enumerate(zip(host_ids, tops, strict=True))
        ]


def _is_decode(output: SchedulerOutput) -> bool:
    """Every scheduled sequence computes exactly its one last token."""
    return all(item.num_new_tokens == 1 and item.produces_logits for item in output.scheduled)


def _pad_rows(lists: list[list[int]]) -> np.ndarray:
    """The lists as the rows of an int64 matrix, padded with -1 (at least one column)."""
    width = max(1, *(len(x) for x in lists))
    out = np.full((len(lists), width), -1, dtype=np.int64)
    for row, x in enumerate(lists):
        out[row, : len(x)] = x
    return out


def _verify(rows: list[_Row], draws: list[SampledToken]) -> dict[int, list[SampledToken]]:
    """Each sequence's emitted tokens: its draw, or after a verification the draws up to the
    first that differs from its proposal (see llm_core.engine.speculative)."""
    out: dict[int, list[SampledToken]] = {}
    i = 0
    while i < len(rows):
        seq = rows[i].seq
        n = 1
        while i + n < len(rows) and rows[i + n].seq is seq:
            n += 1
        proposals = rows[i + n - 1].proposals
        group = draws[i : i + n]
        emitted = accept_draws(proposals, [t.token_id for t in group])
        out[seq.seq_id] = group[: len(emitted)]
        i += n
    return out


def _penalty_meta(rows: list[_Row], params: list[SamplingParams]) -> PenaltyMetadata:
    return PenaltyMetadata(
        prompt_ids=_pad_rows([r.seq.prompt_token_ids for r in rows]),
        output_ids=_pad_rows([r.seq.output_token_ids + r.proposals for r in rows]),
        presence=np.array([p.presence_penalty for p in params]),
        frequency=np.array([p.frequency_penalty for p in params]),
        repetition=np.array([p.repetition_penalty for p in params]),
    )
