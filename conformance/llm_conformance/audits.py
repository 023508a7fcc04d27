"""Engine audits: the same requests served under different engine configurations must produce
the same tokens (greedy, and seeded sampling where the batch could matter).

- batch invariance: requests alone, and in mixed batches of 8 and 32 (greedy and seeded
  sampling, other prompts around them). Where the backend promises batch invariance in the
  dtype (``Backend.batch_invariant``), tokens and log-probabilities must be identical, with no
  near-tie allowance: that is the engine's seeded-determinism promise. Where it does not, the
  audit says "not promised" and checks agreement up to near-ties, like the others;
- prefix cache: prompts that share a long prefix, with the cache on (and hit) and off;
- chunked prefill: prompts split into 8-token chunks, and whole;
- preemption: a KV cache too small for the batch, so sequences are preempted and recomputed;
- graph capture: decode steps replayed from a captured graph (``Backend.capture_graph``, the
  engine's default where the backend captures) against the same steps run operator by operator;
- speculative decoding: greedy requests served with n-gram proposals and with a draft model that
  is the target itself (every proposal must be accepted), against the plain engine; then, with
  the prefix cache on, requests that extend those outputs and so reuse the KV blocks the
  speculative steps wrote. Every block must be free or evictable when they finish.

The reference configuration is the plain engine with the prefix cache off. Each audit also
checks that it exercised what it audits (cache hits happened, a sequence was preempted,
proposals were made and accepted).
Tokens must match; the one divergence accepted is a near-tie: at the first differing position
both runs saw the same context, and if their top log-probabilities there agree within the
dtype's tie margin, a different batch shape has flipped two nearly equal tokens (low-precision
kernels are rarely batch-invariant). It is reported, never hidden. Where the backend promises
batch invariance in the dtype, no near-tie is accepted by any audit (chunking, the prefix cache
and recompute change only which rows share a step, which the promise covers; so does a
verification, whose rows are decodes). A proposal of the draft model that the target rejected
is judged by the same rule, with the proposal in place of the other run's token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_core import LLM, SamplingParams
from llm_core.engine.draft_model import DraftModelProposer
from llm_hal import Backend, DType

from llm_conformance.models import ModelUnderTest, kv_block_bytes
from llm_conformance.serving import engine_on
from llm_conformance.tolerances import MODEL_THRESHOLDS

AUDITS: tuple[str, ...] = (
    "batch_invariance",
    "prefix_cache",
    "chunked_prefill",
    "preemption",
    "graph_capture",
    "speculative_decoding",
)
BLOCK_SIZE = 16
#: Batch sizes the batch-invariance audit serves its requests in (besides alone).
INVARIANCE_BATCHES = (8, 32)
#: Requests of the batch-invariance audit compared with the same request served alone.
INVARIANCE_ALONE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
LONG_GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=5)
#: The speculative-decoding audit: n-gram proposals (vLLM's prompt lookup) and a draft model.
SPEC_NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
              "prompt_lookup_max": 4}  # fmt: skip
SPEC_DRAFT_TOKENS = 3
SPEC_GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)
#: The second round: each prompt extended by this many of its first round's output tokens.
SPEC_EXTEND = 16
SPEC_EXTENDED = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)


@dataclass(slots=True)
class AuditResult:
    name: str
    passed: bool
    detail: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "detail": self.detail, **self.metrics}


Run = tuple[list[int], list[dict[int, float]]]  # tokens, top log-probabilities per step


def _runs(outputs: list[Any]) -> list[Run]:
    return [
        (
            o.outputs[0].token_ids,
            [{t: lp.logprob for t, lp in step.items()} for step in (o.outputs[0].logprobs or [])],
        )
        for o in outputs
    ]


def promises_batch_invariance(backend: Backend, dtype: DType) -> bool:
    """Whether ``backend`` promises batch invariance in ``dtype`` (``Backend.batch_invariant``;
    a backend without the method promises nothing)."""
    promise = getattr(backend, "batch_invariant", None)
    return bool(promise(dtype)) if callable(promise) else False


def _identical(got: list[Run], want: list[Run], what: str) -> str:
    """Where batch invariance is promised: the same tokens and the same log-probabilities, bit
    for bit; the first difference, or ""."""
    for i, ((g, g_lp), (w, w_lp)) in enumerate(zip(got, want, strict=True)):
        if g != w:
            at = next((n for n, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            return f"{what}: request {i} differs at token {at}: {g[at:][:4]} vs {w[at:][:4]}"
        if g_lp != w_lp:
            at = next(n for n, (a, b) in enumerate(zip(g_lp, w_lp)) if a != b)
            return f"{what}: request {i}: log-probabilities differ at token {at}"
    return ""


def _diff(got: list[Run], want: list[Run], tolerance: float) -> tuple[str, list[str]]:
    """Tokens must match. A divergence is accepted only where both runs saw the same context
    and their log-probabilities there agree within ``tolerance`` (a near-tie that a different
    batch shape may legitimately flip in low precision); anything else is a failure."""
    notes: list[str] = []
    for i, ((g, g_lp), (w, w_lp)) in enumerate(zip(got, want, strict=True)):
        if g == w:
            continue
        at = next((n for n, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        if at >= min(len(g), len(w)):
            return f"prompt {i}: {len(g)} tokens, want {len(w)}", notes
        shared = set(g_lp[at]) & set(w_lp[at])
        worst = max((abs(g_lp[at][t] - w_lp[at][t]) for t in shared), default=math.inf)
        near_tie = g[at] in w_lp[at] and w[at] in g_lp[at] and worst <= tolerance
        if not near_tie:
            return (
                f"prompt {i} differs at token {at}: {g[at : at + 4]} vs {w[at : at + 4]} "
                f"(log-probabilities there differ by {worst:.3g}, tolerance {tolerance:g})"
            ), notes
        notes.append(f"prompt {i}: near-tie at token {at} (|dlogprob| {worst:.2g})")
    return "", notes


class Auditor:
    """Runs the audits of one model on one backend in one dtype."""

    def __init__(self, backend: Backend, model: ModelUnderTest, dtype: DType, seed: int):
        self.backend = backend
        self.model = model
        self.dtype = dtype
        self.seed = seed
        config = model.checkpoint.config
        self.block_bytes = kv_block_bytes(config, dtype.itemsize, BLOCK_SIZE)
        self._base: LLM | None = None
        self.promised = promises_batch_invariance(backend, dtype)
        # A batch-invariant backend leaves no near-tie to excuse.
        self.tolerance = 0.0 if self.promised else MODEL_THRESHOLDS[dtype].tie_margin

    def engine(self, **args: Any) -> LLM:
        args.setdefault("kv_cache_memory", 256 * self.block_bytes)
        args.setdefault("enable_prefix_caching", False)
        args.setdefault("block_size", BLOCK_SIZE)
        args.setdefault("seed", self.seed)
        return engine_on(self.backend, str(self.model.path), self.dtype.value, **args)

    @property
    def base(self) -> LLM:
        if self._base is None:
            self._base = self.engine()
        return self._base

    def run(self, names: tuple[str, ...] = AUDITS) -> list[AuditResult]:
        checks: dict[str, Callable[[], AuditResult]] = {
            "batch_invariance": self.batch_invariance,
            "prefix_cache": self.prefix_cache,
            "chunked_prefill": self.chunked_prefill,
            "preemption": self.preemption,
            "graph_capture": self.graph_capture,
            "speculative_decoding": self.speculative_decoding,
        }
        results = []
        for name in names:
            try:
                results.append(checks[name]())
            except Exception as exc:
                results.append(AuditResult(name, False, f"raised {type(exc).__name__}: {exc}"))
        return results

    # -- the audits ----------------------------------------------------------------------------

    def batch_invariance(self) -> AuditResult:
        """Requests alone (whole prefills), then the first of them in batches of 8 and 32 among
        other requests, seeded sampling and greedy, the prompts prefilled in 64-token steps."""
        prompts = self.model.audit_prompts
        size = max(INVARIANCE_BATCHES)
        requests = [prompts[i % len(prompts)] for i in range(size)]
        params = [self._seeded(i) if i % 2 == 0 else GREEDY for i in range(size)]
        alone = [
            _runs(self.base.generate([requests[i]], params[i], use_tqdm=False))[0]
            for i in range(INVARIANCE_ALONE)
        ]
        chunked = self.engine(max_num_batched_tokens=64, enable_chunked_prefill=True)
        batches = {
            n: _runs(chunked.generate(requests[:n], params[:n], use_tqdm=False))
            for n in INVARIANCE_BATCHES
        }
        metrics: dict[str, Any] = {"batches": [1, *INVARIANCE_BATCHES], "chunk_tokens": 64}
        if self.promised:
            diff = ""
            for n, runs in batches.items():
                diff = diff or _identical(runs[:INVARIANCE_ALONE], alone, f"alone vs batch of {n}")
            small, large = min(batches), max(batches)
            diff = diff or _identical(
                batches[large][:small], batches[small], f"batch of {small} vs batch of {large}"
            )
            detail = diff or (
                f"promised in {self.dtype.value}: identical tokens and log-probabilities alone "
                f"and in batches of {', '.join(map(str, INVARIANCE_BATCHES))} (prefilled in "
                "64-token steps)"
            )
            return AuditResult("batch_invariance", not diff, detail, {**metrics, "promised": True})
        diff, notes = "", list[str]()
        for runs in batches.values():
            found, near_ties = _diff(runs[:INVARIANCE_ALONE], alone, self.tolerance)
            diff = diff or found
            notes += near_ties
        result = _result("batch_invariance", diff, notes, {**metrics, "promised": False})
        result.detail = (
            f"not promised by the backend in {self.dtype.value} (near-ties accepted): "
            f"{result.detail}"
        )
        return result

    def _seeded(self, i: int) -> SamplingParams:
        return SamplingParams(
            temperature=0.9,
            top_p=0.9,
            seed=(self.seed + i) % 2**31,
            max_tokens=12,
            ignore_eos=True,
            logprobs=5,
        )

    def prefix_cache(self) -> AuditResult:
        prompts = self.model.audit_prompts[4:7]
        want = _runs(self.base.generate(prompts, GREEDY, use_tqdm=False))
        cached = self.engine(enable_prefix_caching=True)
        first = cached.generate(prompts[:1], GREEDY, use_tqdm=False)
        rest = cached.generate(prompts[1:], GREEDY, use_tqdm=False)
        hits = [o.num_cached_tokens for o in rest]
        diff, notes = _diff(_runs(first + rest), want, self.tolerance)
        if not diff and min(hits) < BLOCK_SIZE:
            diff = f"the prefix cache was not hit (cached tokens {hits}): the audit proves nothing"
        return _result("prefix_cache", diff, notes, {"cached_tokens": hits})

    def chunked_prefill(self) -> AuditResult:
        prompts = self.model.audit_prompts[4:7] + self.model.audit_prompts[:2]
        want = _runs(self.base.generate(prompts, GREEDY, use_tqdm=False))
        chunked = self.engine(max_num_batched_tokens=8, enable_chunked_prefill=True)
        diff, notes = _diff(
            _runs(chunked.generate(prompts, GREEDY, use_tqdm=False)), want, self.tolerance
        )
        return _result("chunked_prefill", diff, notes, {"chunk_tokens": 8})

    def preemption(self) -> AuditResult:
        prompts = self.model.audit_prompts[7:] + self.model.audit_prompts[:3]
        want = _runs(self.base.generate(prompts, LONG_GREEDY, use_tqdm=False))
        # Each sequence needs about 5 blocks by its end; all together need far more than 8.
        small = self.engine(kv_cache_memory=8 * self.block_bytes)
        engine = small.llm_engine
        for i, prompt in enumerate(prompts):
            engine.add_request(f"audit-{i}", prompt, LONG_GREEDY)
        finished: dict[str, Any] = {}
        preemptions = 0
        while engine.has_unfinished_requests():
            running = list(engine.scheduler.running) + list(engine.scheduler.waiting)
            preemptions = max(preemptions, sum(s.num_preemptions for s in running))
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        got = _runs([finished[f"audit-{i}"] for i in range(len(prompts))])
        diff, notes = _diff(got, want, self.tolerance)
        if not diff and preemptions == 0:
            diff = "no sequence was preempted: the audit proves nothing"
        return _result("preemption", diff, notes, {"preemptions": preemptions})

    def graph_capture(self) -> AuditResult:
        prompts = self.model.audit_prompts[:4]
        want = _runs(self.engine(eager=True).generate(prompts, LONG_GREEDY, use_tqdm=False))
        got = _runs(self.base.generate(prompts, LONG_GREEDY, use_tqdm=False))
        diff, notes = _diff(got, want, self.tolerance)
        return _result("graph_capture", diff, notes, {"reference": "eager decode"})

    def speculative_decoding(self) -> AuditResult:
        """Greedy tokens with speculative decoding are the plain engine's.

        Two proposers: n-gram prompt lookup (k=4, n-grams of 1 to 4 tokens) and a draft model
        that is the target's own checkpoint (k=3): the draft's greedy proposal is the target's
        greedy token in the same context, so every proposal must be accepted. The prompts: the
        first four audit prompts and one audit prompt said three times, whose continuation
        prompt lookup finds at once. Each speculative engine has the prefix cache on and serves
        a second round: every prompt extended by its first 16 output tokens, which hits the
        cached blocks the verification steps wrote (a rejected proposal's KV left in a cached
        block would change these tokens). After each round no KV block may still be held.
        Fails as "did not exercise speculation" unless n-gram proposals were made and accepted
        and the draft made proposals.
        """
        prompts = [*self.model.audit_prompts[:4], self.model.audit_prompts[7] * 3]
        want = _runs(self.base.generate(prompts, SPEC_GREEDY, use_tqdm=False))
        draft = {
            "method": "draft_model",
            "model": str(self.model.path),
            "num_speculative_tokens": SPEC_DRAFT_TOKENS,
        }
        metrics: dict[str, Any] = {}
        notes: list[str] = []
        summary: list[str] = []
        extended_refs: dict[tuple[tuple[int, ...], ...], list[Run]] = {}
        for leg, config in (("ngram", SPEC_NGRAM), ("draft", draft)):
            diff = self._speculative_leg(
                leg, config, prompts, want, extended_refs, metrics, notes, summary
            )
            if diff:
                return _result("speculative_decoding", diff, notes, metrics)
        result = _result("speculative_decoding", "", notes, metrics)
        result.detail = f"{result.detail} ({'; '.join(summary)}; every KV block released)"
        return result

    def _speculative_leg(
        self,
        leg: str,
        config: dict[str, Any],
        prompts: list[list[int]],
        want: list[Run],
        extended_refs: dict[tuple[tuple[int, ...], ...], list[Run]],
        metrics: dict[str, Any],
        notes: list[str],
        summary: list[str],
    ) -> str:
        """One proposer of the speculative-decoding audit: its failure, or "" (``metrics``,
        ``notes`` and ``summary`` gain its own)."""
        llm = self.engine(speculative_config=config, enable_prefix_caching=True)
        engine = llm.llm_engine
        log: _ProposalLog | None = None
        if leg == "draft":
            if not isinstance(engine.proposer, DraftModelProposer):
                return "draft: the engine loaded no draft model"
            log = _ProposalLog(engine.proposer.runner)
            engine.proposer = log
        first = llm.generate(prompts, SPEC_GREEDY, use_tqdm=False)
        diff, near_ties = _diff(_runs(first), want, self.tolerance)
        if diff or (diff := _held_blocks(engine)):
            return f"{leg}: {diff}"
        # Extended by their own output: the prompts hit the blocks the verifications wrote.
        extended = [p + o.outputs[0].token_ids[:SPEC_EXTEND] for p, o in zip(prompts, first)]
        key = tuple(tuple(p) for p in extended)
        if key not in extended_refs:
            extended_refs[key] = _runs(self.base.generate(extended, SPEC_EXTENDED, use_tqdm=False))
        second = llm.generate(extended, SPEC_EXTENDED, use_tqdm=False)
        hits = [o.num_cached_tokens for o in second]
        stats = engine.spec_stats
        proposed, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
        metrics.update(
            {f"{leg}_proposed": proposed, f"{leg}_accepted": accepted, f"{leg}_cached": hits}
        )
        diff, more = _diff(_runs(second), extended_refs[key], self.tolerance)
        notes += [f"{leg}: {note}" for note in near_ties + more]
        if diff:
            return f"{leg}, prompts extended by their output: {diff}"
        if diff := _held_blocks(engine):
            return f"{leg}: {diff}"
        if any(h <= len(p) for h, p in zip(hits, prompts)):
            return (
                f"{leg}: the extended prompts did not reuse the blocks written while speculating "
                f"(cached tokens {hits}, prompts of {[len(p) for p in prompts]} tokens)"
            )
        if proposed == 0 or accepted == 0:
            return (
                f"{leg}: did not exercise speculation ({proposed} proposals, {accepted} "
                "accepted): the audit proves nothing"
            )
        if log is not None and accepted < proposed:
            # A draft equal to its target proposes the target's own greedy tokens.
            names = {o.request_id: f"prompt {i}" for i, o in enumerate(first)}
            names |= {o.request_id: f"extended prompt {i}" for i, o in enumerate(second)}
            outputs = {o.request_id: (names[o.request_id], o.outputs[0]) for o in first + second}
            diff, excused = log.judge(outputs, self.tolerance)
            if not diff and not excused:
                diff = "the engine counted rejections that no output shows"
            if diff:
                return (
                    f"draft: a draft model equal to its target had {accepted} of {proposed} "
                    f"proposals accepted, not all: {diff}"
                )
            notes += [f"draft: {note}" for note in excused]
        summary.append(f"{leg}: {accepted}/{proposed} proposals accepted")
        return ""


class _ProposalLog(DraftModelProposer):
    """The engine's draft proposer, keeping every proposal it makes: where the target rejected
    one, the audit compares the two tokens' log-probabilities there."""

    def __init__(self, runner: Any):
        super().__init__(runner)
        #: (request id, output index of the first proposal, the proposals)
        self.made: list[tuple[str, int, list[int]]] = []

    def fill(self, items: list[Any]) -> None:
        super().fill(items)
        for item in items:
            seq = item.seq
            self.made.append(
                (seq.request_id, seq.num_output_tokens, list(seq.spec_token_ids[: item.num_spec]))
            )

    def judge(self, outputs: dict[str, tuple[str, Any]], tolerance: float) -> tuple[str, list[str]]:
        """Every proposal the target did not emit (``outputs``: request id -> its name and its
        completion): the first one that is not a near-tie (the proposal within ``tolerance`` of
        the emitted token's log-probability, as any audit accepts), or "" and the near-ties."""
        near_ties: list[str] = []
        for request_id, start, proposed in self.made:
            name, out = outputs[request_id]
            for j, x in enumerate(proposed):
                at = start + j
                if at >= len(out.token_ids):
                    return f"{name}: proposal {j} lies past its output", near_ties
                y = out.token_ids[at]
                if y == x:
                    continue
                top = {t: lp.logprob for t, lp in (out.logprobs or [])[at].items()}
                if x not in top or y not in top:
                    return (
                        f"{name}: proposal {x} rejected at token {at} for {y}, the proposal "
                        "not among the target's top 5 there"
                    ), near_ties
                gap = top[y] - top[x]
                if gap > tolerance:
                    return (
                        f"{name}: proposal {x} rejected at token {at} for {y} "
                        f"(log-probabilities {gap:.3g} apart, tolerance {tolerance:g})"
                    ), near_ties
                near_ties.append(f"{name}: near-tie rejection at token {at} (|dlogprob| {gap:.2g})")
                break
        return "", near_ties


def _held_blocks(engine: Any) -> str:
    """What is left behind once every request has been served: requests not finished, or KV
    blocks neither free nor evictable (still referenced); "" when nothing."""
    if engine.has_unfinished_requests():
        return f"{engine.get_num_unfinished_requests()} requests left unfinished"
    bm = engine.block_manager
    held = bm.num_blocks - bm.num_available_blocks
    if held:
        return f"{held} of {bm.num_blocks} KV blocks still held after every request finished"
    return ""


def _result(name: str, diff: str, notes: list[str], metrics: dict[str, Any]) -> AuditResult:
    detail = diff or ("; ".join(notes) if notes else "token-exact")
    return AuditResult(name, not diff, detail, {**metrics, "near_ties": len(notes)})
