"""The conformance suite as pytest tests (collected by ``pytest --pyargs llm_conformance``).

One test per backend x operator x dtype, and one per backend x model x dtype. A backend that
cannot run here skips with its reason; a failure message carries the replay command.
"""

from __future__ import annotations

from typing import Any

import pytest

from llm_conformance.opsuite import FAILED, UNSUPPORTED
from llm_conformance.runner import CERTIFIED, NOT_RUN, Conformance


def _backend(run: Conformance, name: str) -> Any:
    backend = next(b for b in run.backends() if b.name == name)
    if not backend.available:
        pytest.skip(f"NOT RUN: backend {name} unavailable: {backend.reason}")
    return backend


def test_operator(conformance: Conformance, op_case: tuple[str, str, Any]) -> None:
    name, op, dtype = op_case
    backend = _backend(conformance, name)
    result = conformance.op_result(backend, op, dtype)
    if result.status == UNSUPPORTED:
        pytest.skip(f"{op} is declared unsupported in {dtype.value} (and raises as it should)")
    failures = [
        f"case {c.index} ({c.summary()})\n    replay: {c.replay_command(name, conformance.seed)}"
        for c in result.failed_cases
    ]
    assert result.status != FAILED, f"{op} failed in {dtype.value}:\n" + "\n".join(failures)


def test_model(conformance: Conformance, model_case: tuple[str, int, Any]) -> None:
    name, index, dtype = model_case
    backend = _backend(conformance, name)
    cell = conformance.cell(backend, conformance.models()[index], dtype)
    if cell.status == NOT_RUN:
        pytest.skip("; ".join(cell.reasons))
    assert cell.status == CERTIFIED, (
        f"{cell.model} x {name} x {dtype.value}: {cell.status}: "
        + "; ".join(cell.reasons)
        + f"\n    replay: {cell.replay}"
    )
