"""``llm-core conformance diff``: the first operator where a backend parts from another.

The same greedy request is served twice by the real engine, once on the candidate backend and
once on the other side (``against``: another backend in the same dtype, or ``reference``, the
HAL's :class:`~llm_hal.TorchBackend` in float64), each through a :class:`CallRecorder` that
records every HAL call. Every call of the candidate is rerun, with the candidate's own inputs,
on the float64 reference and on the other backend (:class:`EqualInputsCheck`): the first call
whose output is beyond its op's tolerance there is the divergence, blamed on the side whose
output is out of tolerance. The two call streams are also aligned call by call (same op,
step and layer) to show how far apart they drift, and the generated tokens are compared.

Memory stays bounded: digests, statistics and a fixed-size sketch per call; tensors only for
the diverging call and for the calls named with ``keep_ops`` (written as replay bundles).
"""

from __future__ import annotations

import gc
import logging
import math
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from llm_core import SamplingParams
from llm_hal import Backend, DType, TorchBackend, get_registry

from llm_conformance.bundle import write_bundle
from llm_conformance.call_record import CallRecord, drift, output_tolerance
from llm_conformance.call_recorder import CallRecorder
from llm_conformance.environment import describe_backend, fingerprint
from llm_conformance.equal_inputs import EqualInputsCheck, Rerun, op_class
from llm_conformance.models import ModelUnderTest, kv_block_bytes
from llm_conformance.op_call import HostCall
from llm_conformance.runner import Conformance
from llm_conformance.serving import engine_on
from llm_conformance.tolerances import SUITE_VERSION

log = logging.getLogger("llm_conformance.diff")

#: The other side when none is named: the HAL's reference, serving in float64.
REFERENCE = "reference"
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog."
DEFAULT_MAX_TOKENS = 4
FORMAT = "llm-core-conformance-diff"

Outputs = list[tuple[str, torch.Tensor]]


class DiffError(RuntimeError):
    """The diff cannot run here (a backend is unavailable, a dtype unsupported)."""


@dataclass(slots=True)
class Culprit:
    """The first diverging call, with its tensors: what a replay bundle holds."""

    record: CallRecord
    call: HostCall
    candidate: Outputs
    reference: Outputs
    against: Outputs


@dataclass(slots=True)
class Side:
    """One side of the diff: its backend, the dtype it serves in, what it recorded."""

    name: str
    backend: Backend
    dtype: DType
    recorder: CallRecorder | None = None
    tokens: list[int] = field(default_factory=list)
    error: str = ""


@dataclass(slots=True)
class KeepRule:
    """``OP`` or ``OP@PLACE`` (a layer number, ``embedding``, ``head``, ``sampling``)."""

    op: str
    place: str | None = None

    @classmethod
    def parse(cls, text: str) -> KeepRule:
        op, _, place = text.partition("@")
        if place.isdigit():
            place = f"layer {place}"
        return cls(op.strip(), place.strip() or None)

    def matches(self, record: CallRecord) -> bool:
        return record.op == self.op and self.place in (None, record.where)


class Diff:
    """A configured diff. ``run()`` returns the JSON record (a dict); afterwards ``culprit``
    holds the diverging call's tensors, and :meth:`dump` writes them as a replay bundle.

    ``model``: an architecture (``llama``, ``LlamaForCausalLM``: a tiny random-weight
    checkpoint), ``smollm2`` for the demo model, or a checkpoint path. ``backend`` and
    ``against``: registry names or instances; ``against="reference"`` is the HAL reference in
    float64. ``keep_ops``: ``OP`` or ``OP@LAYER`` whose calls are written as bundles under
    ``keep_dir``.
    """

    def __init__(
        self,
        model: str,
        backend: str | Backend,
        against: str | Backend = REFERENCE,
        dtype: str | DType = DType.FP32,
        prompt: str | list[int] | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        seed: int = 1234,
        keep_ops: Sequence[str] = (),
        keep_dir: pathlib.Path | None = None,
        memory: int = 1 << 30,
        progress: Callable[[str], None] | None = None,
    ):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if keep_ops and keep_dir is None:
            raise ValueError("keeping the tensors of named ops needs a directory (--dump DIR)")
        self.model_name = model
        self.dtype = DType.parse(dtype)
        self.prompt = prompt if prompt is not None else DEFAULT_PROMPT
        self.max_tokens = max_tokens
        self.seed = seed
        self.keep = [KeepRule.parse(k) for k in keep_ops]
        self.keep_dir = keep_dir
        self.memory = memory
        self.progress = progress or (lambda message: log.info("%s", message))
        self.candidate = self._side(backend, self.dtype)
        reference = isinstance(against, str) and against == REFERENCE
        self.against_is_reference = reference
        self.against = self._side(
            TorchBackend("cpu") if reference else against, DType.FP64 if reference else self.dtype
        )
        if reference:
            self.against.name = REFERENCE
        self.block_size = self.candidate.backend.preferred_block_size
        self.culprit: Culprit | None = None
        self.kept: list[pathlib.Path] = []
        self.prompt_ids: list[int] = []
        self._model: ModelUnderTest | None = None
        self._tokenizer: Any = None
        self._environment: dict[str, Any] | None = None

    def _side(self, backend: str | Backend, dtype: DType) -> Side:
        if isinstance(backend, Backend):
            instance = backend
        else:
            try:
                instance = get_registry().create(backend)
            except Exception as exc:
                reason = getattr(exc, "reason", None) or str(exc)
                raise DiffError(f"backend {backend} cannot run here: {reason}") from exc
        if dtype not in instance.float_dtypes:
            supported = ", ".join(sorted(d.value for d in instance.float_dtypes))
            raise DiffError(
                f"backend {instance.name} does not compute in {dtype.value} (it does in: "
                f"{supported})"
            )
        return Side(instance.name, instance, dtype)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with Conformance(backends=[], models=[self.model_name], seed=self.seed) as suite:
            (model,) = suite.models()
            if isinstance(model, tuple):
                raise DiffError(f"model {model[0]} cannot run here: {model[1]}")
            self._model = model
            self._tokenizer = model.checkpoint.load_tokenizer()
            self.prompt_ids = (
                list(self.prompt)
                if isinstance(self.prompt, list)
                else list(self._tokenizer.encode(self.prompt))
            )
            self.progress(
                f"diff {model.name} in {self.dtype.value}: {self.candidate.name} against "
                f"{self.against.name}, {len(self.prompt_ids)} prompt tokens, "
                f"{self.max_tokens} new tokens"
            )
            self._serve(self.against, model, CallRecorder(self.against.backend, memory=self.memory))
            check = EqualInputsCheck(
                None if self.against_is_reference else self.against.backend, self.memory
            )
            recorder = CallRecorder(self.candidate.backend, check, self._on_call, self.memory)
            self._serve(self.candidate, model, recorder)
            return self.record()

    def _serve(self, side: Side, model: ModelUnderTest, recorder: CallRecorder) -> None:
        """Serve the request on one side through its recorder (greedy, eager: a captured graph
        would replay its calls past the recorder)."""
        side.recorder = recorder
        blocks = -(-(len(self.prompt_ids) + self.max_tokens) // self.block_size) + 1
        config = model.checkpoint.config
        llm = None
        try:
            llm = engine_on(
                recorder,
                str(model.path),
                side.dtype.value,
                eager=True,
                seed=self.seed,
                block_size=self.block_size,
                kv_cache_memory=blocks
                * kv_block_bytes(config, side.dtype.itemsize, self.block_size),
                enable_prefix_caching=False,
                max_num_seqs=1,
            )
            engine = llm.llm_engine
            recorder.serve(engine.model, engine.runner.kv_caches)
            params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True)
            (output,) = llm.generate([self.prompt_ids], params, use_tqdm=False)
            side.tokens = list(output.outputs[0].token_ids)
            if getattr(output, "error", None):
                side.error = str(output.error)
        except Exception as exc:
            log.debug("%s failed", side.name, exc_info=True)
            side.error = f"{type(exc).__name__}: {exc}"
        finally:
            del llm
            gc.collect()
        calls = len(recorder.records)
        self.progress(
            f"{side.name}: {calls} calls recorded, tokens {side.tokens}"
            + (f"; failed: {side.error}" if side.error else "")
        )

    def _on_call(
        self, record: CallRecord, call: HostCall, outputs: Outputs, rerun: Rerun | None
    ) -> None:
        rerun = rerun or Rerun()
        if record.diverged and self.culprit is None:
            self.culprit = Culprit(record, call, outputs, rerun.reference, rerun.against)
            self.progress(
                f"first divergence: call {record.index} {record.op} in {record.where} "
                f"(step {record.step})"
            )
        if self.keep_dir is not None and any(rule.matches(record) for rule in self.keep):
            name = f"{record.index:05d}-{record.op}-{record.where.replace(' ', '')}"
            self.kept.append(
                write_bundle(
                    self.keep_dir / "kept" / name,
                    call,
                    {"candidate": outputs, "reference": rerun.reference, "against": rerun.against},
                    self._bundle_context(record),
                )
            )

    # -- the record ----------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The JSON record of the diff (see docs/conformance.md, "diff")."""
        assert self._model is not None
        cand = self.candidate.recorder.records if self.candidate.recorder else []
        other = self.against.recorder.records if self.against.recorder else []
        aligned = _align(cand, other)
        first = self.culprit.record if self.culprit else None
        tokens = self._tokens()
        verdict = self._verdict(first, tokens)
        return {
            "format": FORMAT,
            "version": 1,
            "suite_version": SUITE_VERSION,
            "model": {
                "name": self._model.name,
                "architecture": self._model.architecture,
                "kind": self._model.kind,
                "path": str(self._model.path),
            },
            "dtype": self.dtype.value,
            "prompt": self.prompt if isinstance(self.prompt, str) else None,
            "prompt_token_ids": self.prompt_ids,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "block_size": self.block_size,
            "candidate": self._describe(self.candidate),
            "against": self._describe(self.against),
            "reference": "llm_hal.TorchBackend on the CPU in float64, given the candidate's inputs",
            "verdict": verdict,
            "first_divergence": self._divergence(first) if first else None,
            "tokens": tokens,
            "streams": self._streams(cand, other, aligned),
            "layers": _layers(cand, aligned),
            "calls": [r.as_dict() for r in cand],
            "environment": self.environment(),
            "kept": [str(p) for p in self.kept],
        }

    def environment(self) -> dict[str, Any]:
        """The environment fingerprint of certificates (taken once: it asks git)."""
        if self._environment is None:
            self._environment = fingerprint()
        return self._environment

    def _describe(self, side: Side) -> dict[str, Any]:
        record = get_registry().records.get(side.name)
        return {
            "backend": side.name,
            "dtype": side.dtype.value,
            **describe_backend(side.backend, record),
            **({"error": side.error} if side.error else {}),
        }

    def _tokens(self) -> dict[str, Any]:
        ours, theirs = self.candidate.tokens, self.against.tokens
        first = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            None if len(ours) == len(theirs) else min(len(ours), len(theirs)),
        )
        out: dict[str, Any] = {"candidate": ours, "against": theirs, "first_difference": None}
        if first is not None:
            a = ours[first] if first < len(ours) else None
            b = theirs[first] if first < len(theirs) else None
            out["first_difference"] = {
                "index": first,
                "position": len(self.prompt_ids) + first,
                "candidate": a,
                "against": b,
                "candidate_text": self._text(a),
                "against_text": self._text(b),
            }
        return out

    def _text(self, token: int | None) -> str | None:
        if token is None or self._tokenizer is None:
            return None
        try:
            return str(self._tokenizer.decode([token]))
        except Exception:
            return None

    def _divergence(self, record: CallRecord) -> dict[str, Any]:
        wrong = _wrong_side(record)
        blamed = record.reference if wrong in ("candidate", "both") else record.against
        steps = self.candidate.recorder.steps if self.candidate.recorder else {}
        position = None
        if blamed is not None and blamed.worst_index is not None and record.step in steps:
            output = record.output(blamed.worst)
            if output is not None:
                position = steps[record.step].position(record.op, output.shape, blamed.worst_index)
        return {
            "call": record.index,
            "op": record.op,
            "where": record.where,
            "layer": record.layer,
            "step": record.step,
            "phase": _phase(record),
            "token_position": position,
            "wrong_side": wrong,
            "wrong_backend": self._wrong_backend(wrong),
            **record.as_dict(),
        }

    def _wrong_backend(self, wrong: str) -> str:
        return {
            "candidate": self.candidate.name,
            "against": self.against.name,
            "both": f"{self.candidate.name} and {self.against.name}",
        }.get(wrong, "")

    def _verdict(self, first: CallRecord | None, tokens: dict[str, Any]) -> dict[str, Any]:
        differ = tokens["first_difference"]
        errors = [f"{s.name}: {s.error}" for s in (self.candidate, self.against) if s.error]
        if first is None:
            summary = "no operator diverges beyond its tolerance on equal inputs"
            if differ is not None:
                summary += (
                    f"; the generated tokens differ from token {differ['index']} on "
                    "(accumulated rounding: a near-tie, not a faulty operator)"
                )
            if errors:
                summary += "; but " + "; ".join(errors)
            return {"diverged": False, "wrong_side": None, "summary": summary, "errors": errors}
        wrong = _wrong_side(first)
        blamed = first.reference if wrong in ("candidate", "both") else first.against
        worst = f"NMSE {blamed.nmse:.3g}, max abs {blamed.max_abs:.3g}" if blamed else ""
        summary = (
            f"{first.op} in {first.where} ({_phase(first)}, call {first.index}) diverges on "
            f"equal inputs: {self._wrong_backend(wrong)} out of tolerance ({worst})"
        )
        return {
            "diverged": True,
            "wrong_side": wrong,
            "wrong_backend": self._wrong_backend(wrong),
            "summary": summary,
            "errors": errors,
        }

    def _streams(
        self, cand: list[CallRecord], other: list[CallRecord], aligned: list[_Pair]
    ) -> dict[str, Any]:
        first_bits = next((p for p in aligned if p.bitwise_differs), None)
        first_drift = next((p for p in aligned if p.beyond), None)
        matched = {id(p.candidate) for p in aligned}
        matched_other = {id(p.other) for p in aligned}
        return {
            "candidate_calls": len(cand),
            "against_calls": len(other),
            "aligned": len(aligned),
            "only_candidate": [_brief(r) for r in cand if id(r) not in matched][:20],
            "only_against": [_brief(r) for r in other if id(r) not in matched_other][:20],
            "first_bitwise_difference": first_bits.as_dict() if first_bits else None,
            "first_drift_beyond_tolerance": first_drift.as_dict() if first_drift else None,
        }

    # -- bundles -------------------------------------------------------------------------------

    def dump(self, directory: str | pathlib.Path) -> pathlib.Path | None:
        """Write the diverging call as a replay bundle in ``directory`` (None if none)."""
        if self.culprit is None:
            return None
        c = self.culprit
        return write_bundle(
            directory,
            c.call,
            {"candidate": c.candidate, "reference": c.reference, "against": c.against},
            self._bundle_context(c.record),
        )

    def _bundle_context(self, record: CallRecord) -> dict[str, Any]:
        assert self._model is not None
        return {
            "op_class": op_class(record.op),
            "context": {
                "model": self._model.name,
                "architecture": self._model.architecture,
                "dtype": self.dtype.value,
                "call": record.index,
                "where": record.where,
                "layer": record.layer,
                "step": record.step,
                "prompt_token_ids": self.prompt_ids,
                "seed": self.seed,
            },
            "comparison": {
                name: comparison.as_dict()
                for name, comparison in (
                    ("candidate_vs_reference", record.reference),
                    ("against_vs_reference", record.against),
                )
                if comparison is not None
            },
            "backend": self._describe(self.candidate),
            "against": None if self.against_is_reference else self._describe(self.against),
            "suite_version": SUITE_VERSION,
            "environment": self.environment(),
        }


# -- alignment ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pair:
    """One call of the candidate and the same call of the other side."""

    candidate: CallRecord
    other: CallRecord
    drift: float  # estimated NMSE of the candidate's outputs against the other side's
    bitwise_differs: bool
    beyond: bool  # drift above the op's NMSE cap

    def as_dict(self) -> dict[str, Any]:
        return {
            **_brief(self.candidate),
            "against_call": self.other.index,
            "drift_nmse": self.drift if math.isfinite(self.drift) else str(self.drift),
        }


def _align(cand: list[CallRecord], other: list[CallRecord]) -> list[_Pair]:
    """Pairs of calls with the same op at the same step, place and occurrence."""
    theirs = {r.key: r for r in other}
    pairs = []
    for record in cand:
        match = theirs.get(record.key)
        if match is None:
            continue
        worst, differs, beyond = 0.0, False, False
        cls = op_class(record.op)
        for out in record.outputs:
            counterpart = match.output(out.name)
            if counterpart is None:
                continue
            d = drift(out, counterpart)
            differs = differs or out.digest != counterpart.digest
            worst = max(worst, d)
            beyond = beyond or d > _drift_cap(record.op, out.name, cls, out.dtype)
        pairs.append(_Pair(record, match, worst, differs, beyond))
    return pairs


def _drift_cap(op: str, output: str, cls: str, dtype_name: str) -> float:
    """How far an output may drift from the other side's before the streams have parted: the
    op's NMSE cap. Exact classes (copies, gathers, cache writes) only carry what drifted
    upstream, and integer outputs (sampled ids) are the tokens: neither marks the parting."""
    dtype = getattr(torch, dtype_name, torch.float32)
    if not dtype.is_floating_point:
        return math.inf
    tol = output_tolerance(op, output, cls, dtype)
    return math.inf if tol.exact else tol.nmse


def _layers(cand: list[CallRecord], aligned: list[_Pair]) -> dict[str, Any]:
    """Per op and place (embedding, layer 0..N-1, head, sampling): the largest NMSE on equal
    inputs, the largest drift between the streams, and where the op failed."""
    places: list[str] = []
    equal: dict[str, dict[str, float]] = {}
    drifts: dict[str, dict[str, float]] = {}
    failed: dict[str, list[str]] = {}
    for record in cand:
        if record.where == "load":
            continue
        if record.where not in places:
            places.append(record.where)
        if record.reference is not None:
            row = equal.setdefault(record.op, {})
            row[record.where] = max(row.get(record.where, 0.0), record.reference.nmse)
        if record.diverged:
            spots = failed.setdefault(record.op, [])
            if record.where not in spots:
                spots.append(record.where)
    for pair in aligned:
        if pair.candidate.where == "load":
            continue
        row = drifts.setdefault(pair.candidate.op, {})
        row[pair.candidate.where] = max(row.get(pair.candidate.where, 0.0), pair.drift)
    order = {"embedding": -1, "head": 10**9, "sampling": 10**9 + 1}
    places.sort(key=lambda p: order.get(p, int(p.split()[1]) if p.startswith("layer ") else 0))
    return {
        "places": places,
        "equal_inputs_nmse": _json_floats(equal),
        "drift_nmse": _json_floats(drifts),
        "failed": failed,
    }


def _json_floats(table: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {
        op: {p: v if math.isfinite(v) else str(v) for p, v in row.items()}
        for op, row in table.items()
    }


def _wrong_side(record: CallRecord) -> str:
    ours = record.reference is not None and not record.reference.passed
    theirs = record.against is not None and not record.against.passed
    if ours and theirs:
        return "both"
    return "candidate" if ours else ("against" if theirs else "")


def _phase(record: CallRecord) -> str:
    if record.step is None:
        return "load"
    return "prefill" if record.step == 0 else f"decode step {record.step}"


def _brief(record: CallRecord) -> dict[str, Any]:
    return {"call": record.index, "op": record.op, "where": record.where, "step": record.step}
