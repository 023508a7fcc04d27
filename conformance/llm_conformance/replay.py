"""Replay one operator case exactly as a run did, and explain every check of it; or replay a
bundle written by ``llm-core conformance diff --dump`` (one recorded HAL call, self-contained)."""

from __future__ import annotations

import json
import pathlib
import traceback
from dataclasses import dataclass, field

import torch
from llm_hal import Backend, DType, TorchBackend, get_registry

from llm_conformance.bundle import Bundle
from llm_conformance.call_record import Comparison, compare_outputs, error_metrics
from llm_conformance.cases import OpSpec, describe, specs
from llm_conformance.equal_inputs import op_class
from llm_conformance.harness import Harness, case_seed
from llm_conformance.op_call import execute, reference_outputs
from llm_conformance.opsuite import CaseResult, declared, run_case
from llm_conformance.tolerances import WAIVERS, tolerance


def replay(backend: Backend, op: str, case: int, dtype: DType, seed: int) -> CaseResult:
    """Run case ``case`` of ``op`` with the run's seed: the same inputs, the same checks."""
    spec = _spec(op, case)
    supported = declared(backend, spec, case, dtype)
    return run_case(backend, spec, case, dtype, seed, WAIVERS, expect_unsupported=not supported)


def raised_traceback(backend: Backend, op: str, case: int, dtype: DType, seed: int) -> str | None:
    """The full Python traceback of the exception case ``case`` of ``op`` raises, or None when
    it raises nothing. A run keeps only the exception's one-line message and innermost frame;
    this runs the case once more, on the same inputs, and lets the exception come up to here.
    """
    spec = _spec(op, case)
    harness = Harness(backend, op, spec.op_class, dtype, case_seed(seed, op, case, dtype), WAIVERS)
    try:
        spec.run(harness, spec.cases[case])
    except Exception:
        return traceback.format_exc()
    return None


def _spec(op: str, case: int) -> OpSpec:
    all_specs = specs()
    if op not in all_specs:
        raise ValueError(f"unknown operator {op!r}; the suite checks: {', '.join(all_specs)}")
    spec = all_specs[op]
    if not 0 <= case < len(spec.cases):
        raise ValueError(f"{op} has cases 0..{len(spec.cases) - 1}, not {case}")
    return spec


def explain(result: CaseResult, backend: str) -> str:
    """Every check of a case, with its metrics, as lines of text."""
    spec = specs()[result.op]
    lines = [
        f"{backend} {result.op} case {result.index} in {result.dtype.value}: "
        f"{result.status.upper()} ({result.seconds:.2f}s)",
        f"  parameters: {describe(result.params)}",
        f"  tolerance class: {spec.op_class} ({tolerance(spec.op_class, result.dtype).describe()})",
    ]
    if spec.depends_on:
        lines.append(f"  inputs prepared with: {', '.join(spec.depends_on)}")
    if result.error:
        lines.append(f"  error: {result.error}")
    for check in result.checks:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in check.metrics.items())
        lines.append(f"  - {check}" + (f" [{metrics}]" if metrics else ""))
    if result.waivers:
        lines.append(f"  waivers applied: {', '.join(result.waivers)}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# replay bundles (llm-core conformance diff --dump)
# -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class BundleReplay:
    """A bundle's call run again on ``backend``, held to the reference on the same inputs."""

    bundle: Bundle
    backend: str
    comparison: Comparison | None
    outputs: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    error: str = ""

    @property
    def failed(self) -> bool:
        """The call is out of tolerance (or raised) here: the recorded divergence reproduces
        when ``backend`` is the recorded one."""
        return bool(self.error) or (self.comparison is not None and not self.comparison.passed)

    def same_as_recorded(self) -> tuple[bool, float] | None:
        """(bit-identical, max abs difference) against the candidate's recorded outputs."""
        recorded = dict(self.bundle.outputs("candidate"))
        if not recorded or not self.outputs:
            return None
        identical, worst = True, 0.0
        for name, t in self.outputs:
            r = recorded.get(name)
            if r is None or r.shape != t.shape or r.dtype != t.dtype:
                return False, float("inf")
            identical &= torch.equal(t.contiguous().view(-1).view(torch.uint8),
                                     r.contiguous().view(-1).view(torch.uint8))  # fmt: skip
            worst = max(worst, error_metrics(t, r)[1])
        return identical, worst


def replay_bundle(path: str | pathlib.Path, backend: Backend | None = None) -> BundleReplay:
    """Run the call of the bundle at ``path`` on ``backend`` (default: a new instance of the
    backend it was recorded on, from the registry) and on the float64 reference, with the
    recorded inputs, and compare."""
    bundle = Bundle.load(path)
    if backend is None:
        backend = get_registry().create(bundle.manifest["backend"]["backend"])
    call = bundle.call()
    want = reference_outputs(call, TorchBackend("cpu"))
    result = BundleReplay(bundle, backend.name, None)
    try:
        result.outputs = execute(backend, call)
    except Exception as exc:
        result.error = f"raised {type(exc).__name__}: {exc}"
        return result
    cls = bundle.manifest.get("op_class") or op_class(call.op)
    result.comparison = compare_outputs(call.op, cls, result.outputs, want, call.kv_len)
    return result


def explain_bundle(result: BundleReplay) -> str:
    """What the replay found, as lines of text."""
    manifest = result.bundle.manifest
    context = manifest.get("context", {})
    recorded = manifest.get("backend", {})
    lines = [
        f"bundle {result.bundle.path}: {manifest['op']} from {context.get('model')} in "
        f"{context.get('dtype')}, {context.get('where')} (step {context.get('step')}, call "
        f"{context.get('call')}), recorded on {recorded.get('backend')} "
        f"{recorded.get('version', '')}".rstrip(),
        f"  attributes: {json.dumps(manifest.get('attributes', {}), sort_keys=True)}",
    ]
    for side, comparison in manifest.get("comparison", {}).items():
        lines.append(
            f"  recorded {side.replace('_', ' ')}: {'ok' if comparison['passed'] else 'FAILED'} "
            f"(NMSE {float(comparison['nmse']):.3g}, max abs {float(comparison['max_abs']):.3g})"
        )
    if result.error:
        lines.append(f"  replayed on {result.backend}: FAILED: {result.error}")
        return "\n".join(lines)
    c = result.comparison
    assert c is not None
    lines.append(
        f"  replayed on {result.backend} vs reference: {'ok' if c.passed else 'FAILED'} "
        f"(NMSE {c.nmse:.3g}, max abs {c.max_abs:.3g}, max rel {c.max_rel:.3g}) [{c.tolerance}]"
    )
    lines += [f"    - {f}" for f in c.failures]
    same = result.same_as_recorded()
    if same is not None:
        identical, worst = same
        lines.append(
            "  replayed outputs are bit-identical to the recorded candidate's"
            if identical
            else f"  replayed outputs differ from the recorded candidate's (max abs {worst:.3g})"
        )
    if c.passed:
        lines.append(f"  => the divergence does not reproduce on {result.backend}")
    else:
        lines.append(f"  => reproduced: {manifest['op']} on {result.backend} is out of tolerance")
    return "\n".join(lines)
