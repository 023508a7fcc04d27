"""LLMEngine: requests in, tokens out, one scheduled step at a time.

``step()`` reads as the protocol it is: schedule, run the model, update the sequences, turn the
new tokens into outputs. Loading (checkpoint, backend, KV cache sizing) happens once in
``__init__``.

A step whose model run raises (a backend operator failed) fails only the requests that had a
sequence in that step: they finish with finish reason "error" and ``RequestOutput.error``
saying what raised, their KV blocks are freed, and nothing the step computed reaches the prefix
cache. Every other request carries on, and the engine keeps serving.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

from llm_hal import Backend, DType, FallbackBackend, get_registry
from llm_hal.spec import BackendConfig
from tqdm.auto import tqdm

from llm_core.config import EngineArgs
from llm_core.engine.block_manager import BlockManager
from llm_core.engine.detokenizer import IncrementalDetokenizer
from llm_core.engine.draft_model import DraftModelProposer
from llm_core.engine.grammar_compiler import GrammarCompiler, GrammarError
from llm_core.engine.model_runner import ModelRunner, SampledToken, SeqSampling, StepResult
from llm_core.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from llm_core.engine.sequence import Sequence
from llm_core.engine.speculative import (
    NgramProposer,
    SpecStats,
    SpeculativeConfig,
)
from llm_core.loaders.opener import open_checkpoint
from llm_core.models.registry import model_class_for
from llm_core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from llm_core.sampling_params import SamplingParams

log = logging.getLogger("llm_core.engine")

_DEFAULT_KV_CAP = 4 * 2**30
#: Name of a backend that runs the operators the chosen backend lacks (off when unset).
ENV_FALLBACK = "LLM_CORE_FALLBACK"


class RequestError(ValueError):
    """A request that cannot be served as given; the message says what to change."""


@dataclass(slots=True)
class _Completion:
    """The per-child state of a request: its sequence, text and stop bookkeeping."""

    index: int
    seq: Sequence
    detok: IncrementalDetokenizer
    sampling: SeqSampling
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=self.seq.output_token_ids,  # a fresh list
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[_Completion]
    metrics: RequestMetrics
    #: None first (the first token has no context), then one entry per prompt token; None
    #: when not asked for.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    #: Why the engine failed this request (see :meth:`LLMEngine._fail_step`).
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            # Outputs come once the prefill is done: the list is whole and no longer changes.
            prompt_logprobs=self.prompt_logprobs,
            outputs=[c.output() for c in self.completions],
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=self.completions[0].seq.num_cached_tokens,
            error=self.error,
        )


class LLMEngine:
    """The synchronous engine. Not thread-safe: drive it from one thread (see AsyncLLM)."""

    def __init__(self, args: EngineArgs):
        self.args = args
        self.backend = _create_backend(args)
        self.block_size = args.block_size or self.backend.preferred_block_size
        checkpoint = open_checkpoint(args.model)
        self.checkpoint = checkpoint
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.load_tokenizer()
        self.dtype = _resolve_dtype(args.dtype, checkpoint, self.backend)
        model_cls = model_class_for(self.model_config)
        self.model = model_cls(self.model_config, self.backend, self.dtype)
        self.max_model_len = min(
            args.max_model_len or self.model.max_position, self.model.max_position
        )
        if args.max_model_len and args.max_model_len > self.model.max_position:
            raise ValueError(
                f"max_model_len {args.max_model_len} is longer than the model's "
                f"{self.model.max_position} positions; use at most {self.model.max_position}"
            )
        weights = tqdm(
            checkpoint.tensors(),
            total=checkpoint.num_tensors(),
            desc="Loading weights",
            unit="tensor",
            disable=not args.load_progress,
            leave=False,
        )
        start = time.perf_counter()
        self.weight_bytes = self.model.load_weights(weights)
        load_seconds = time.perf_counter() - start
        spec = args.speculative_config
        assert spec is None or isinstance(spec, SpeculativeConfig), "EngineArgs parses it"
        self.speculative_config = spec
        draft = self._load_draft(spec.model) if spec and spec.method == "draft_model" else None
        num_blocks = self._num_kv_blocks()
        kv_caches = self._kv_caches(self.model, num_blocks)
        self.kv_cache_bytes = num_blocks * self._bytes_per_block()
        self.memory_report = {
            "weights_bytes": self.weight_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_cache_blocks": num_blocks,
            "kv_cache_tokens": num_blocks * self.block_size,
            "load_seconds": round(load_seconds, 3),
        }
        log.info(
            "loaded %s on %s in %s: weights %.1f MiB, KV cache %.1f MiB (%d tokens) in %.1fs",
            checkpoint.path.name,
            self.backend.name,
            self.dtype.value,
            self.weight_bytes / 2**20,
            self.kv_cache_bytes / 2**20,
            num_blocks * self.block_size,
            load_seconds,
        )
        self.block_manager = BlockManager(num_blocks, self.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_chunked_prefill=args.enable_chunked_prefill,
                max_model_len=self.max_model_len,
                recompute_past=self.model.rope_switch_length,
            ),
            self.block_manager,
        )
        self.eos_token_ids = _eos_ids(self.model_config, self.tokenizer)
        self.grammar = GrammarCompiler(self.tokenizer, self.model.vocab_size, self.eos_token_ids)
        self.runner = ModelRunner(
            self.model, self.backend, kv_caches, self.block_size, grammar=self.grammar
        )
        #: Speculative decoding: the proposer (None: off) and its acceptance counters.
        self.proposer: NgramProposer | DraftModelProposer | None = None
        self.spec_stats = SpecStats(spec.num_speculative_tokens if spec else 0)
        if spec is not None and draft is None:
            self.proposer = NgramProposer(spec)
        elif draft is not None:
            draft_kv = self._kv_caches(draft, num_blocks)
            self.proposer = DraftModelProposer(
                ModelRunner(
                    draft,
                    self.backend,
                    draft_kv,
                    self.block_size,
                    max_positions=self.model.max_position,  # it reads the target's tables
                )
            )
            draft_bytes = num_blocks * self._bytes_per_block(draft)
            self.memory_report["draft_kv_cache_bytes"] = draft_bytes
            log.info("draft model KV cache %.1f MiB", draft_bytes / 2**20)
        self._rng = random.Random(args.seed)
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, tuple[_Request, _Completion]] = {}
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # ------------------------------------------------------------------------------------------
    # sizing
    # ------------------------------------------------------------------------------------------

    def _kv_caches(self, model: Any, num_blocks: int) -> list[tuple[Any, Any]]:
        return [
            self.backend.allocate_kv_cache(
                num_blocks, self.block_size, model.num_kv_heads, model.head_size, self.dtype
            )
            for _ in range(model.num_layers)
        ]

    def _load_draft(self, path: str | None) -> Any:
        """The draft model of speculative decoding, in the target's dtype on its backend; its
        tokenizer must be the target's (proposals are token ids)."""
        checkpoint = open_checkpoint(path)
        draft = model_class_for(checkpoint.config)(checkpoint.config, self.backend, self.dtype)
        if draft.vocab_size != self.model.vocab_size:
            raise ValueError(
                f"the draft model {path} has a vocabulary of {draft.vocab_size} tokens, the "
                f"target {self.model.vocab_size}; a draft model must share the target's "
                "tokenizer"
            )
        theirs, ours = checkpoint.load_tokenizer(), self.tokenizer
        probe = "Speculative decoding, 123 + 456 = 579!\n  def f(x): return x"
        if list(theirs.encode(probe)) != list(ours.encode(probe)):
            raise ValueError(
                f"the draft model {path} tokenizes text differently from the target; a draft "
                "model must share the target's tokenizer"
            )
        self.weight_bytes += draft.load_weights(checkpoint.tensors())
        return draft

    def _bytes_per_block(self, model: Any = None) -> int:
        m = model or self.model
        per_token = 2 * m.num_layers * m.num_kv_heads * m.head_size * self.dtype.itemsize
        return int(per_token * self.block_size)

    def _num_kv_blocks(self) -> int:
        args = self.args
        per_block = self._bytes_per_block()
        if args.kv_cache_memory is not None:
            budget = int(args.kv_cache_memory)
        else:
            free = self.backend.memory_info().free
            blocks_needed = args.max_num_seqs * -(-self.max_model_len // self.block_size)
            budget = min(free // 2, _DEFAULT_KV_CAP, blocks_needed * per_block)
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(
                f"kv_cache_memory of {budget} bytes holds no block ({per_block} bytes per block "
                f"of {self.block_size} tokens); give the KV cache more memory"
            )
        return int(blocks)

    # ------------------------------------------------------------------------------------------
    # requests
    # ------------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> str:
        """Queue a request (a prompt string or token ids; with token ids, ``prompt_text`` is
        the prompt the output reports). Raises RequestError at once, and queues nothing, if it
        cannot be served."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = list(self.tokenizer.encode(prompt))
        else:
            text, token_ids = prompt_text, [int(t) for t in prompt]
        self._validate(token_ids, params)
        matchers = self._matchers(params)
        now = time.time() if arrival_time is None else arrival_time
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        completions = []
        for index in range(params.n):
            seq = Sequence(request_id, token_ids, max_tokens, arrival_time=now)
            # The prompt's log-probabilities are computed once, by the first completion, which
            # must compute every prompt position: it reads no prefix-cache hits (until done).
            seq.skip_prefix_cache = index == 0 and params.prompt_logprobs is not None
            seed = (params.seed + index) if params.seed is not None else self._rng.getrandbits(62)
            detok = IncrementalDetokenizer(
                self.tokenizer,
                token_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
            )
            sampling = SeqSampling(params, seed, self._banned(params, 0), matcher=matchers[index])
            if index == 0:  # the completions share the prompt: compute its logprobs once
                sampling.prompt_logprobs = params.prompt_logprobs
            comp = _Completion(index, seq, detok, sampling)
            if params.logprobs is not None:
                comp.logprobs, comp.cumulative_logprob = [], 0.0
            completions.append(comp)
        request = _Request(request_id, text, token_ids, completions, RequestMetrics(now))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self._requests[request_id] = request
        for comp in completions:
            self._by_seq[comp.seq.seq_id] = (request, comp)
            self.scheduler.add(comp.seq)
        return request_id

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise RequestError("the prompt is empty; give at least one token")
        vocab = self.model.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        bad = [t for t in params.stop_token_ids or [] if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab}); "
                "such tokens can never be generated"
            )
        if len(token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(token_ids)} tokens, but the model's context is "
                f"{self.max_model_len} tokens (max_model_len) including at least one generated "
                f"token; shorten the prompt or raise max_model_len"
            )
        # As with max_model_len, the prompt and one generated token must fit.
        problem = self.scheduler.check_prompt(len(token_ids), reserve=1)
        if problem:
            raise RequestError(problem)

    def _matchers(self, params: SamplingParams) -> list[Any]:
        """One grammar matcher per completion for a guided request (None each otherwise)."""
        if params.guided_decoding is None:
            return [None] * params.n
        try:
            return [self.grammar.matcher(params.guided_decoding) for _ in range(params.n)]
        except GrammarError as exc:
            raise RequestError(str(exc)) from exc

    def _banned(self, params: SamplingParams, num_output: int) -> list[int]:
        if num_output >= params.min_tokens:
            return []
        banned = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            banned |= self.eos_token_ids
        return sorted(banned)

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop requests now; their KV blocks are freed at once. Unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else request_id
        for rid in ids:
            request = self._requests.pop(rid, None)
            if request is None:
                continue
            self.scheduler.abort(rid)
            for comp in request.completions:
                self._by_seq.pop(comp.seq.seq_id, None)
                comp.finish_reason = comp.finish_reason or "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the outputs of requests that advanced."""
        self._propose()
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return self._ignored(scheduled.ignored)
        sampling = {
            s.seq.seq_id: self._by_seq[s.seq.seq_id][1].sampling for s in scheduled.scheduled
        }
        try:
            verifying = [item for item in scheduled.scheduled if item.num_spec]
            if verifying:
                assert self.proposer is not None, "only proposals are verified"
                self.proposer.fill(verifying)
            result = self.runner.execute(scheduled, sampling)
        except Exception as exc:
            return self._fail_step(scheduled, exc) + self._ignored(scheduled.ignored)
        self._add_prompt_logprobs(result)
        sampled = result.sampled
        for seq_id, proposed in result.proposed.items():
            self.spec_stats.record(proposed, len(sampled[seq_id]) - 1)
        self.scheduler.postprocess(
            scheduled, {sid: [t.token_id for t in tokens] for sid, tokens in sampled.items()}
        )
        return self._process(sampled) + self._ignored(scheduled.ignored)

    def _propose(self) -> None:
        """Speculative decoding: proposals for every running sequence that decodes next step
        (not for guided ones, whose grammar must see each token, nor while prompt
        log-probabilities are pending). The draft model's are filled in once the step is
        scheduled (its KV slots are the verification's); until then they are placeholders."""
        if self.proposer is None:
            return
        k = self.spec_stats.k
        for seq in self.scheduler.running:
            seq.spec_token_ids = []
            if seq.num_uncomputed_tokens != 1:
                continue
            info = self._by_seq[seq.seq_id][1].sampling
            if info.matcher is not None or seq.skip_prefix_cache:
                continue
            seq.spec_token_ids = self.proposer.propose(seq, k)

    def _fail_step(self, scheduled: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """The model run of ``scheduled`` raised: finish every request with a sequence in it,
        with finish reason "error" and the exception in ``RequestOutput.error``.

        All of such a request's sequences are dropped and their blocks freed at once (one
        completion of ``n`` cannot go on alone). The step is never post-processed, so its
        sequences did not advance and none of the blocks it wrote was offered to the prefix
        cache; the cached blocks it read are only released.
        """
        failed = list(dict.fromkeys(item.seq.request_id for item in scheduled.scheduled))
        message = (
            f"the model step failed on backend {self.backend.name}: {type(exc).__name__}: {exc}"
        )
        log.error(
            "a step of %d sequences raised; failing requests %s",
            len(scheduled.scheduled),
            ", ".join(failed),
            exc_info=exc,
        )
        now = time.time()
        outputs = []
        for request_id in failed:
            request = self._requests.pop(request_id, None)
            if request is None:
                continue
            self.scheduler.abort(request_id)
            for comp in request.completions:
                self._by_seq.pop(comp.seq.seq_id, None)
                comp.finish_reason = comp.finish_reason or "error"
            request.error = message
            request.metrics.finished_time = now
            outputs.append(request.output())
        return outputs

    def _add_prompt_logprobs(self, result: StepResult) -> None:
        for seq_id, tokens in result.prompt_logprobs.items():
            request, comp = self._by_seq[seq_id]
            assert request.prompt_logprobs is not None, "only requests that asked get them"
            request.prompt_logprobs.extend(self._logprob_entry(t) for t in tokens)
            if len(request.prompt_logprobs) == len(request.prompt_token_ids):
                comp.seq.skip_prefix_cache = False  # done: a recompute may use the cache

    def _logprob_entry(self, token: SampledToken) -> dict[int, Logprob]:
        """The token's log-probability and the top ones, with their text (vLLM's form)."""
        assert token.logprob is not None, "a token with log-probabilities"
        entry = {i: Logprob(v, rank + 1) for rank, (i, v) in enumerate(token.top or [])}
        entry[token.token_id] = Logprob(token.logprob, token.rank)
        for i, lp in entry.items():
            lp.decoded_token = str(self.tokenizer.decode([i]))
        return entry

    def _ignored(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """Sequences the scheduler gave up on (they outgrew the model or the cache): they end
        with finish reason "length"; the scheduler has already freed their blocks."""
        outputs = []
        for seq in seqs:
            entry = self._by_seq.pop(seq.seq_id, None)
            if entry is None:
                continue
            request, comp = entry
            comp.finish_reason = "length"
            if request.finished:
                self._requests.pop(request.request_id, None)
                outputs.append(request.output())
        return outputs

    def _process(self, sampled: dict[int, list[SampledToken]]) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, _Request] = {}
        for seq_id, tokens in sampled.items():
            request, comp = self._by_seq[seq_id]
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            request.metrics.last_token_time = now
            for j, token in enumerate(tokens):
                later = len(tokens) - 1 - j  # tokens the step emitted after this one
                self._append(comp, token, later)
                if comp.finish_reason is not None:
                    comp.seq.drop_last_tokens(later)  # never output: they follow the stop
                    break
            if comp.finish_reason is not None:
                self.scheduler.finish(comp.seq)
                del self._by_seq[seq_id]
            touched[request.request_id] = request
        outputs = []
        for rid, request in touched.items():
            if request.finished:
                request.metrics.finished_time = now
                del self._requests[rid]
            outputs.append(request.output())
        return outputs

    def _append(self, comp: _Completion, token: SampledToken, later: int = 0) -> None:
        """Output ``token``, the sequence's last token but ``later`` (already appended by the
        scheduler), and decide whether the completion stops at it."""
        seq, params = comp.seq, comp.sampling.params
        tid = token.token_id
        if comp.logprobs is not None and token.logprob is not None:
            comp.logprobs.append(self._logprob_entry(token))
            comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + token.logprob
        num_out = seq.num_output_tokens - later
        comp.sampling.banned = self._banned(params, num_out)
        new_text = comp.detok.add([tid]) if params.detokenize else ""
        matcher = comp.sampling.matcher
        if matcher is not None and not matcher.consume_token(tid):
            # The mask allows only tokens the grammar accepts: this is a bug, not bad input.
            log.error("guided decoding: token %d was refused: %s", tid, matcher.get_error())
            comp.finish_reason = "abort"
            return
        # EOS and stop tokens are banned from sampling before min_tokens, so no count check.
        if tid in self.eos_token_ids and not params.ignore_eos:
            comp.finish_reason = "stop"
        elif matcher is not None and matcher.is_stopped():
            comp.finish_reason = "stop"  # the grammar is complete and allows nothing more
        elif tid in (params.stop_token_ids or []):
            comp.finish_reason, comp.stop_reason = "stop", tid
        stoppable = comp.finish_reason is None and params.stop_strings and new_text
        if stoppable and self._check_stop_strings(comp, new_text, num_out):
            return
        comp.text += new_text
        if comp.finish_reason is None and (
            num_out >= seq.max_tokens or seq.num_tokens - later >= self.max_model_len
        ):
            comp.finish_reason = "length"
        if comp.finish_reason is not None and params.detokenize and comp.finish_reason == "length":
            comp.text += comp.detok.flush()

    def _check_stop_strings(self, comp: _Completion, new_text: str, num_out: int) -> bool:
        params = comp.sampling.params
        if num_out < params.min_tokens:
            return False
        # Only the new text, and the end of the old that a stop string could begin in, can
        # hold a stop string that was not there before.
        longest = max(len(s) for s in params.stop_strings)
        start = max(0, len(comp.text) - longest + 1)
        tail = comp.text[start:] + new_text
        best: tuple[int, str] | None = None
        for stop in params.stop_strings:
            at = tail.find(stop)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        end = at + len(stop) if params.include_stop_str_in_output else at
        comp.text = comp.text[:start] + tail[:end]
        comp.finish_reason, comp.stop_reason = "stop", stop
        return True


def _create_backend(args: EngineArgs) -> Backend:
    registry = get_registry()
    config = BackendConfig(device_index=args.device_index, options=dict(args.backend_options))
    backend = registry.create(args.backend, config)
    fallback = args.fallback_backend or os.environ.get(ENV_FALLBACK)
    if fallback:
        return FallbackBackend(backend, registry.create(fallback, config))
    return backend


def _resolve_dtype(requested: str, checkpoint: Any, backend: Backend) -> DType:
    if requested != "auto":
        dtype = DType.parse(requested)
        if not backend.supports("linear", dtype):
            supported = ", ".join(sorted(d.value for d in backend.float_dtypes))
            raise ValueError(
                f"backend {backend.name} does not compute in {dtype.value}; use one of: {supported}"
            )
        return dtype
    stored = None if checkpoint.format == "gguf" else getattr(checkpoint.config, "dtype", None)
    dtype = DType.BF16 if stored is None else DType.parse(str(stored))
    dtype = backend.auto_dtype_substitutes.get(dtype, dtype)
    if not backend.supports("linear", dtype):
        log.info("backend %s does not compute in %s; using float32", backend.name, dtype.value)
        dtype = DType.FP32
    return dtype


def _eos_ids(config: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(x) for x in source)
    return ids
