"""Replay one operator case exactly as a run did, and explain every check of it."""

from __future__ import annotations

import traceback

from llm_hal import Backend, DType

from llm_conformance.cases import OpSpec, describe, specs
from llm_conformance.harness import Harness, case_seed
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
