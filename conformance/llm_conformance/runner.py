"""The conformance run: every backend x every model x every dtype, to a certificate.

For each backend that can run here, the operator level runs first (every checked operator, in
every requested dtype). Then, for each model and dtype, the model is served by the real engine
on that backend wrapped in a recording proxy; the proxy's trace is the set of operators the
model needs. The cell is:

- NOT RUN when the backend cannot run here (with the reason);
- UNSUPPORTED when the backend lacks an operator (or the dtype) the model needs;
- FAILED when a traced operator failed at the operator level, an operator ran through
  fallback, a model-level gate or an engine audit failed, or anything raised;
- CERTIFIED otherwise: never without having run.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from llm_core import SamplingParams
from llm_core.models.base import UnsupportedDTypeError
from llm_hal import Backend, BackendRecord, DType, FallbackBackend, UnsupportedOpError, get_registry

from llm_conformance.audits import AUDITS, Auditor
from llm_conformance.cell import CELL_FAILED, CELL_UNSUPPORTED, CERTIFIED, NOT_RUN, Cell
from llm_conformance.metrics import backend_logits, compare_greedy, compare_logits, gate_logits
from llm_conformance.models import (
    REAL_MODELS,
    ModelUnderTest,
    kv_block_bytes,
    real_model_spec,
    real_model_under_test,
    reference_greedy,
    reference_logits,
    tiny_model_under_test,
)
from llm_conformance.opsuite import (
    FAILED,
    UNSUPPORTED,
    OpResult,
    OpSuite,
    checked_ops,
    dtype_key,
)
from llm_conformance.serving import engine_on
from llm_conformance.tolerances import (
    GREEDY_TOKENS,
    GREEDY_TOP_K,
    MODEL_THRESHOLDS,
    WAIVERS,
    Waiver,
    effective_thresholds,
)
from llm_conformance.tracing import RecordingBackend

log = logging.getLogger("llm_conformance")

DEFAULT_DTYPES: tuple[DType, ...] = (DType.FP32, DType.BF16, DType.FP16)
#: Real models a default run certifies: every built-in model (Gemma 3 270M: 253 MB fetched once,
#: about two minutes for its cells on cpu and opencl).
DEFAULT_REAL_MODELS = ("smollm2", "gemma3-270m")
#: What ``--model`` accepts for the demo model; every real model: ``REAL_MODELS``.
REAL_MODEL_ALIASES = REAL_MODELS["smollm2"].aliases


@dataclass(slots=True)
class BackendUnderTest:
    """One backend of the run: an instance when it can run here, else the reason it cannot."""

    name: str
    instance: Backend | None
    reason: str = ""
    record: BackendRecord | None = None
    ops: OpSuite | None = None
    dtypes: list[DType] = field(default_factory=list)  # what this backend is certified in

    @property
    def available(self) -> bool:
        return self.instance is not None


class Conformance:
    """A configured run. ``run()`` returns the certificate as a dict (unsigned).

    ``backends``: names (looked up in the registry) or instances; None for every installed
    backend. ``models``: architecture names (``LlamaForCausalLM`` or ``llama``), the name of a
    real model (``smollm2``, the demo model; ``gemma3-270m``: ``REAL_MODELS``), or checkpoint
    paths; None for every supported architecture plus every real model (unless ``real_model``
    is False; one that cannot be fetched is NOT RUN, with the reason). ``dtypes``: None for
    each backend's own serving dtypes (see :func:`serving_dtypes`).
    """

    def __init__(
        self,
        backends: Sequence[str | Backend] | None = None,
        models: Sequence[str] | None = None,
        dtypes: Sequence[DType | str] | None = None,
        seed: int = 1234,
        quick: bool = False,
        real_model: bool = True,
        audits: bool = True,
        ops: Sequence[str] | None = None,
        waivers: Sequence[Waiver] = WAIVERS,
        progress: Callable[[str], None] | None = None,
    ):
        self.requested_backends = list(backends) if backends else None
        self.requested_models = list(models) if models else None
        self.requested_dtypes = [DType.parse(d) for d in dtypes] if dtypes else None
        self.seed = seed
        self.quick = quick
        self.real_model = real_model and not quick
        self.run_audits = audits
        self.ops = list(ops) if ops else None
        self.waivers = list(waivers)
        self.progress = progress or (lambda message: log.info("%s", message))
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="llm-conformance-"))
        self._backends: list[BackendUnderTest] | None = None
        self._models: list[ModelUnderTest | tuple[str, str]] | None = None
        self._cells: dict[tuple[str, str, DType], Cell] = {}
        self._greedy_refs: dict[str, Any] = {}
        self._logit_refs: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
        self._audit_cache: dict[tuple[str, str, DType], dict[str, Any]] = {}

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Conformance:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- what is tested ------------------------------------------------------------------------

    def backends(self) -> list[BackendUnderTest]:
        if self._backends is None:
            self._backends = [self._backend(b) for b in self._backend_requests()]
            for backend in self._backends:
                backend.dtypes = self.requested_dtypes or (
                    serving_dtypes(backend.instance) if backend.instance else list(DEFAULT_DTYPES)
                )
        return self._backends

    @property
    def dtypes(self) -> list[DType]:
        """Every dtype of the run, in order: the requested ones, or all the backends' own."""
        if self.requested_dtypes:
            return self.requested_dtypes
        found = {d for b in self.backends() for d in b.dtypes}
        return [d for d in DEFAULT_DTYPES if d in found]

    def _backend_requests(self) -> list[str | Backend]:
        if self.requested_backends is not None:
            return self.requested_backends
        return list(get_registry().names())

    def _backend(self, requested: str | Backend) -> BackendUnderTest:
        registry = get_registry()
        if isinstance(requested, Backend):
            backend = requested
            return BackendUnderTest(
                backend.name, backend, record=registry.records.get(backend.name)
            )
        record = registry.records.get(requested)
        try:
            instance = registry.create(requested)
        except Exception as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            return BackendUnderTest(requested, None, reason, record)
        return BackendUnderTest(requested, instance, record=record)

    def models(self) -> list[ModelUnderTest | tuple[str, str]]:
        """Models to test; a ``(name, reason)`` pair for one that cannot be tested here."""
        if self._models is None:
            self._models = [self._model(name) for name in self._model_requests()]
        return self._models

    def mandatory_architectures(self) -> list[str]:
        from llm_core.models.registry import supported_architectures

        return supported_architectures()

    def _model_requests(self) -> list[str]:
        if self.requested_models is not None:
            return self.requested_models
        names = self.mandatory_architectures()
        return names + (list(DEFAULT_REAL_MODELS) if self.real_model else [])

    def _model(self, name: str) -> ModelUnderTest | tuple[str, str]:
        from llm_core.loaders import CheckpointError, builtin_model_path, default_model_path

        from llm_conformance.checkpoints import model_type_of

        spec = real_model_spec(name)
        if spec is not None:
            try:
                # The demo model honours LLM_CORE_DEFAULT_MODEL, as llm-core itself does.
                default = spec.key == "smollm2"
                path = default_model_path() if default else builtin_model_path(spec.key)
                model = real_model_under_test(path, spec)
            except (CheckpointError, OSError) as exc:
                return (spec.name, f"real model {spec.key} unavailable: {exc}")
            if model.architecture not in self.mandatory_architectures():
                return (spec.name, f"the engine has no model for {model.architecture}")
            return model
        if pathlib.Path(name).exists():
            model = real_model_under_test(pathlib.Path(name))
            model.name = pathlib.Path(name).name
            return model
        architecture = self._architecture(name)
        model_type_of(architecture)  # raises for a name transformers does not know
        directory = self.workdir / architecture
        return tiny_model_under_test(architecture, directory, self.seed)

    def _architecture(self, name: str) -> str:
        for arch in self.mandatory_architectures():
            if name in (arch, arch.lower()) or name.lower() == _model_type(arch):
                return arch
        raise ValueError(
            f"unknown model {name!r}: give an architecture "
            f"({', '.join(self.mandatory_architectures())}), "
            f"a real model ({', '.join(REAL_MODELS)}), or a checkpoint path"
        )

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from llm_conformance.certificate import build_certificate

        start = time.time()
        self.models()  # a bad model name fails before anything runs
        for backend in self.backends():
            if backend.instance is None:
                self.progress(f"{backend.name}: NOT RUN ({backend.reason})")
                continue
            for op, dtype in self.op_suite(backend).keys(self.ops):
                self.op_result(backend, op, dtype)
            for model in self.models():
                for dtype in backend.dtypes:
                    self.cell(backend, model, dtype)
        return build_certificate(self, time.time() - start)

    def op_suite(self, backend: BackendUnderTest) -> OpSuite:
        """The backend's operator level; each operator runs when first asked for."""
        assert backend.instance is not None
        if backend.ops is None:
            backend.ops = OpSuite(
                backend.instance, backend.dtypes, self.seed, self.quick, self.waivers
            )
        return backend.ops

    def op_result(self, backend: BackendUnderTest, op: str, dtype: DType) -> OpResult:
        """One operator in one dtype on one backend (run now if not yet), with progress."""
        suite = self.op_suite(backend)
        fresh = (op, dtype) not in suite.results
        started = time.perf_counter()
        result = suite.result(op, dtype)
        if fresh:
            self.progress(
                f"{backend.name} {op} {dtype.value}: {result.status} "
                f"({result.count('passed')} passed, {result.count('failed')} failed) "
                f"{time.perf_counter() - started:.1f}s"
            )
        return result

    def cells(self) -> list[Cell]:
        return list(self._cells.values())

    def cell(
        self, backend: BackendUnderTest, model: ModelUnderTest | tuple[str, str], dtype: DType
    ) -> Cell:
        name = model[0] if isinstance(model, tuple) else model.name
        key = (name, backend.name, dtype)
        if key not in self._cells:
            started = time.perf_counter()
            if isinstance(model, tuple):
                cell = Cell(name, name, "real", backend.name, dtype, NOT_RUN, [model[1]], ran=False)
            else:
                cell = Cell(model.name, model.architecture, model.kind, backend.name, dtype)
                cell.replay = self._replay(backend.name, model, dtype)
                if backend.instance is None:
                    cell.reasons = [f"backend {backend.name} unavailable: {backend.reason}"]
                    cell.ran = False
                else:
                    self._certify(cell, backend, model, dtype)
            cell.seconds = time.perf_counter() - started
            self.progress(
                f"{backend.name} {name} {dtype.value}: {cell.status}"
                + (f" ({'; '.join(cell.reasons)})" if cell.reasons else "")
                + f" {cell.seconds:.1f}s"
            )
            self._cells[key] = cell
        return self._cells[key]

    def _replay(self, backend: str, model: ModelUnderTest, dtype: DType) -> str:
        if model.kind == "tiny":
            which = model.name
        else:
            keys = {spec.name: key for key, spec in REAL_MODELS.items()}
            which = keys.get(model.name, str(model.path))
        return (
            f"llm-core conformance --backend {backend} --model {which} --dtype {dtype.value} "
            f"--seed {self.seed}"
        )

    # -- one cell ------------------------------------------------------------------------------

    def _certify(
        self, cell: Cell, backend: BackendUnderTest, model: ModelUnderTest, dtype: DType
    ) -> None:
        instance = backend.instance
        assert instance is not None
        if dtype not in instance.float_dtypes:
            cell.status = CELL_UNSUPPORTED
            cell.reasons = [f"backend {backend.name} does not compute in {dtype.value}"]
            cell.ran = False
            return
        if isinstance(instance, FallbackBackend):
            cell.status = CELL_FAILED
            cell.reasons = ["the backend is a FallbackBackend: conformance forbids fallback"]
            return
        recorder = RecordingBackend(instance)
        try:
            llm = self._trace(recorder, model, dtype)
            cell.traced_ops = recorder.traced_ops
            self._model_level(cell, llm, recorder, model, dtype)
        except UnsupportedOpError as exc:
            cell.status = CELL_UNSUPPORTED
            cell.traced_ops = recorder.traced_ops
            cell.reasons = [f"needs operator {exc.op}: {exc}"]
            return
        except UnsupportedDTypeError as exc:
            cell.status = CELL_UNSUPPORTED
            cell.reasons = [str(exc)]
            cell.ran = False
            return
        except Exception as exc:
            log.debug("cell %s failed", cell.model, exc_info=True)
            cell.status = CELL_FAILED
            cell.traced_ops = recorder.traced_ops
            cell.reasons = [f"raised {type(exc).__name__}: {exc}"]
            return
        verdicts, unsupported = self._op_verdicts(backend, cell.traced_ops, dtype)
        cell.reasons += verdicts
        if model.kind == "tiny" and self.run_audits:
            cell.audits = self._audits(backend, model, dtype)
        elif self.run_audits:
            cell.audits = self._audits_of_same_architecture(backend, model, dtype)
        cell.reasons += [
            f"audit {name}: {audit['detail']}"
            for name, audit in cell.audits.items()
            if not audit.get("passed", True)
        ]
        if unsupported and unsupported == len(cell.reasons):
            cell.status = CELL_UNSUPPORTED
        else:
            cell.status = CELL_FAILED if cell.reasons else CERTIFIED

    def _trace(self, recorder: RecordingBackend, model: ModelUnderTest, dtype: DType) -> Any:
        """Serve the model on the recording backend: one greedy and one fully-featured sampled
        request through prefill and decode, so every operator serving needs is called."""
        config = model.checkpoint.config
        blocks = 256 if model.kind == "tiny" else 128
        llm = engine_on(
            recorder,
            str(model.path),
            dtype.value,
            seed=self.seed,
            kv_cache_memory=blocks * kv_block_bytes(config, dtype.itemsize, 16),
        )
        prompt = model.prompts[0]
        llm.generate(
            [prompt, prompt],
            [
                SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=2),
                SamplingParams(
                    temperature=0.8,
                    top_k=20,
                    top_p=0.9,
                    min_p=0.05,
                    repetition_penalty=1.1,
                    presence_penalty=0.1,
                    frequency_penalty=0.1,
                    min_tokens=2,
                    max_tokens=2,
                    seed=self.seed % 2**31,
                    logprobs=1,
                ),
            ],
            use_tqdm=False,
        )
        return llm

    def _model_level(
        self,
        cell: Cell,
        llm: Any,
        recorder: RecordingBackend,
        model: ModelUnderTest,
        dtype: DType,
    ) -> None:
        gates = MODEL_THRESHOLDS[dtype]
        reference = self._reference_logits(model, torch.float32)
        noise_dtype = torch.float64 if dtype is DType.FP32 else _torch(dtype)
        noise = compare_logits(
            self._reference_logits(model, noise_dtype), reference, model.sequences, gates
        )
        cell.noise = {"reference": f"transformers {_name(noise_dtype)} vs float32", **noise}
        effective = effective_thresholds(gates, noise)
        cell.effective_thresholds = effective.as_dict()
        candidate = backend_logits(llm.llm_engine.model, recorder, dtype, model.sequences)
        cell.metrics = compare_logits(candidate, reference, model.sequences, effective)
        cell.reasons += [f"teacher-forced: {p}" for p in gate_logits(cell.metrics, effective)]
        params = SamplingParams(
            temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True, logprobs=GREEDY_TOP_K
        )
        outputs = llm.generate([list(p) for p in model.prompts], params, use_tqdm=False)
        ours = [(o.outputs[0].token_ids, _top_ids(o.outputs[0].logprobs)) for o in outputs]
        if model.name not in self._greedy_refs:
            self._greedy_refs[model.name] = reference_greedy(model, GREEDY_TOKENS, GREEDY_TOP_K)
        cell.greedy, problems = compare_greedy(ours, self._greedy_refs[model.name])
        cell.reasons += [f"greedy: {p}" for p in problems]

    def _reference_logits(self, model: ModelUnderTest, dtype: torch.dtype) -> list[torch.Tensor]:
        key = (model.name, dtype)
        if key not in self._logit_refs:
            self._logit_refs[key] = reference_logits(model, dtype)
        return self._logit_refs[key]

    def _op_verdicts(
        self, backend: BackendUnderTest, traced: list[str], dtype: DType
    ) -> tuple[list[str], int]:
        """The reasons the traced operators give against the cell, and how many of them are
        operators the backend does not support."""
        reasons = []
        unsupported = 0
        for op in traced:
            result = self.op_result(backend, op, dtype_key(op, dtype))
            if result.status == FAILED:
                reasons.append(
                    f"operator {op} failed at the operator level in "
                    f"{result.dtype.value} ({result.count('failed')} cases)"
                )
            elif result.status == UNSUPPORTED:
                reasons.append(f"operator {op} unsupported in {result.dtype.value}")
                unsupported += 1
        return reasons, unsupported

    def _audits(
        self, backend: BackendUnderTest, model: ModelUnderTest, dtype: DType
    ) -> dict[str, Any]:
        key = (model.architecture, backend.name, dtype)
        if key not in self._audit_cache:
            assert backend.instance is not None
            auditor = Auditor(backend.instance, model, dtype, self.seed)
            names = AUDITS[:1] if self.quick else AUDITS
            self._audit_cache[key] = {r.name: r.as_dict() for r in auditor.run(names)}
        return self._audit_cache[key]

    def _audits_of_same_architecture(
        self, backend: BackendUnderTest, model: ModelUnderTest, dtype: DType
    ) -> dict[str, Any]:
        """Engine behaviour does not depend on the weights: a real checkpoint's cell carries
        the audits of the tiny checkpoint of its architecture (run here if not yet)."""
        audits = self._audit_cache.get((model.architecture, backend.name, dtype))
        if audits is None:
            try:
                tiny = tiny_model_under_test(
                    model.architecture, self.workdir / f"audit-{model.architecture}", self.seed
                )
            except ValueError as exc:
                return {"audits": {"passed": False, "detail": f"no tiny checkpoint: {exc}"}}
            audits = self._audits(backend, tiny, dtype)
        # A tiny checkpoint is named after its architecture.
        return {
            name: {
                **result,
                "detail": (result["detail"] or "") + f" (on tiny {model.architecture})",
            }
            for name, result in audits.items()
        }

    # -- summary -------------------------------------------------------------------------------

    def failed_ops(self) -> list[tuple[str, str, DType]]:
        """(backend, op, dtype) of every operator that failed."""
        out = []
        for backend in self.backends():
            if backend.ops is None:
                continue
            for (op, dtype), result in backend.ops.results.items():
                if result.status == FAILED:
                    out.append((backend.name, op, dtype))
        return out

    def exit_status(self) -> int:
        """0: every cell that ran is CERTIFIED and no operator failed; 1: otherwise; 2: nothing
        ran at all. A cell in a dtype the backend does not compute in did not run."""
        ran = [c for c in self.cells() if c.ran]
        if not ran and not any(b.ops for b in self.backends()):
            return 2
        if any(c.status != CERTIFIED for c in ran) or self.failed_ops():
            return 1
        return 0


def serving_dtypes(backend: Backend) -> list[DType]:
    """The dtypes a backend is certified in by default: those of fp32, bf16 and fp16 it
    computes in, less those it substitutes for ``dtype="auto"`` because it computes them poorly
    (the CPU backend serves fp16 checkpoints in bf16). Others are certified when asked for."""
    substituted = getattr(backend, "auto_dtype_substitutes", {}) or {}
    return [d for d in DEFAULT_DTYPES if d in backend.float_dtypes and d not in substituted]


def _top_ids(logprobs: Any) -> list[list[int]]:
    steps = []
    for entry in logprobs or []:
        ranked = sorted(entry.items(), key=lambda kv: kv[1].logprob, reverse=True)
        steps.append([token for token, _ in ranked[:GREEDY_TOP_K]])
    return steps


def _torch(dtype: DType) -> torch.dtype:
    from llm_hal.dtypes import to_torch

    return to_torch(dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _model_type(architecture: str) -> str:
    from llm_conformance.checkpoints import model_type_of

    try:
        return model_type_of(architecture)
    except ValueError:
        return architecture.lower()


__all__ = [
    "CELL_FAILED",
    "CELL_UNSUPPORTED",
    "CERTIFIED",
    "NOT_RUN",
    "Cell",
    "Conformance",
    "checked_ops",
]
