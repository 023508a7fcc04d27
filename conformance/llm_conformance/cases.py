"""The operator checks of the suite: one :class:`OpSpec` per operator, and its generated cases.

Each spec names the operator, its tolerance class, a fixed list of cases (shape and edge-case
parameters, independent of the seed, so "case 17" means the same thing in every run of one
suite version) and the function that runs one case in a :class:`~llm_conformance.harness.Harness`.
The specs live in the ``ops_*`` modules and register themselves with :func:`op_check`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_conformance.harness import Harness

Params = dict[str, Any]
RunCase = Callable[[Harness, Params], None]

#: Device-contract methods the suite checks like operators: the model uses them on every step.
MEMORY_OPS: tuple[str, ...] = (
    "from_host",
    "to_host",
    "copy_",
    "reshape",
    "split",
    "allocate_kv_cache",
)

#: Operators whose inputs are fp32 logits whatever the model's dtype: checked once, in fp32.
FP32_ONLY: frozenset[str] = frozenset(
    {"apply_penalties", "apply_token_bans", "apply_token_bitmask", "sample", "compute_logprobs"}
)


@dataclass(frozen=True, slots=True)
class OpSpec:
    """How the suite checks one operator."""

    op: str
    op_class: str
    cases: tuple[Params, ...]
    run: RunCase
    #: Parameters of ``Backend.supports(op, dtype, **shape)`` for one case.
    shape_of: Callable[[Params], dict[str, Any]] = lambda _: {}
    #: Operators the check uses to set up its inputs (attention fills the cache with
    #: reshape_and_cache): a failure there is reported as a possible cause.
    depends_on: tuple[str, ...] = ()
    #: Case indices run by ``--quick`` (default: every third, starting with the first).
    quick: tuple[int, ...] | None = None
    notes: str = field(default="")

    def quick_indices(self) -> list[int]:
        if self.quick is not None:
            return list(self.quick)
        return list(range(0, len(self.cases), 3))


_SPECS: dict[str, OpSpec] = {}
_MODULES = ("ops_memory", "ops_dense", "ops_attention", "ops_sampling", "ops_moe")


def op_check(
    op: str,
    op_class: str,
    cases: list[Params],
    *,
    shape_of: Callable[[Params], dict[str, Any]] | None = None,
    depends_on: tuple[str, ...] = (),
    quick: tuple[int, ...] | None = None,
) -> Callable[[RunCase], RunCase]:
    """Register the decorated function as the check of ``op``."""

    def register(run: RunCase) -> RunCase:
        if op in _SPECS:
            raise ValueError(f"operator {op} has two checks")
        _SPECS[op] = OpSpec(
            op, op_class, tuple(cases), run, shape_of or (lambda _: {}), depends_on, quick
        )
        return run

    return register


def specs() -> dict[str, OpSpec]:
    """Every registered check, keyed by operator name."""
    for module in _MODULES:
        importlib.import_module(f"llm_conformance.{module}")
    return _SPECS


def describe(params: Params) -> str:
    """A case's parameters as one short line: ``tokens=7 hidden=80 residual``."""
    parts = []
    for key, value in params.items():
        if value is True:
            parts.append(key)
        elif value is False or value is None:
            continue
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
