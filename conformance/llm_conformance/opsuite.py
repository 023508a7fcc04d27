"""The operator level of the suite: every check of every operator on one backend.

Support is tested, not taken on trust: an operator the backend declares (``supports`` is
False) is called anyway and must raise :class:`~llm_hal.UnsupportedOpError`; an operator it
declares supported must run every case without raising it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_hal import OPS, Backend, DType, UnsupportedOpError

from llm_conformance.cases import FP32_ONLY, MEMORY_OPS, OpSpec, Params, describe, specs
from llm_conformance.compare import Check
from llm_conformance.harness import Harness, case_seed
from llm_conformance.tolerances import Waiver

PASSED, FAILED, UNSUPPORTED = "passed", "failed", "unsupported"


@dataclass(slots=True)
class CaseResult:
    """One case of one operator in one dtype."""

    op: str
    index: int
    dtype: DType
    params: Params
    status: str  # passed, failed or unsupported
    checks: list[Check] = field(default_factory=list)
    error: str = ""  # an exception the backend raised, with where
    seconds: float = 0.0
    waivers: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        if self.error:
            return self.error.splitlines()[0]
        return "; ".join(str(c) for c in self.failures)

    def replay_command(self, backend: str, seed: int) -> str:
        return (
            f"llm-core conformance replay --backend {backend} --op {self.op} "
            f"--case {self.index} --dtype {self.dtype.value} --seed {seed}"
        )

    def as_dict(self, backend: str, seed: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "case": self.index,
            "params": describe(self.params),
            "status": self.status,
        }
        if self.status == FAILED:
            out["failures"] = [str(c) for c in self.failures]
            if self.error:
                out["error"] = self.error
            out["replay"] = self.replay_command(backend, seed)
        if self.waivers:
            out["waivers"] = self.waivers
        return out


@dataclass(slots=True)
class OpResult:
    """Every case of one operator in one dtype, and the verdict."""

    op: str
    dtype: DType
    cases: list[CaseResult]
    declared_supported: bool = True

    @property
    def status(self) -> str:
        if any(c.status == FAILED for c in self.cases):
            return FAILED
        if not any(c.status == PASSED for c in self.cases):
            return UNSUPPORTED
        return PASSED

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cases)

    @property
    def failed_cases(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == FAILED]


def checked_ops() -> tuple[str, ...]:
    """Every name the suite checks: the device contract's memory methods, then the HAL ops."""
    return MEMORY_OPS + OPS


def dtype_key(op: str, dtype: DType) -> DType:
    """The dtype an operator is checked in when a model runs in ``dtype``."""
    return DType.FP32 if op in FP32_ONLY else dtype


def declared(backend: Backend, spec: OpSpec, index: int, dtype: DType) -> bool:
    """Does the backend declare case ``index`` of ``spec`` supported (``supports`` for the op,
    the dtype and the case's shape parameters)? The memory methods are always required."""
    if spec.op in MEMORY_OPS:
        return True
    shape = spec.shape_of(spec.cases[index])
    if not backend.supports(spec.op, dtype):
        return False
    return not shape or backend.supports(spec.op, dtype, **shape)


def run_case(
    backend: Backend,
    spec: OpSpec,
    index: int,
    dtype: DType,
    seed: int,
    waivers: Sequence[Waiver] = (),
    expect_unsupported: bool = False,
) -> CaseResult:
    """Run one case. With ``expect_unsupported`` the backend declared it unsupported, and it
    passes only by raising UnsupportedOpError."""
    params = spec.cases[index]
    harness = Harness(
        backend, spec.op, spec.op_class, dtype, case_seed(seed, spec.op, index, dtype), waivers
    )
    result = CaseResult(spec.op, index, dtype, params, PASSED)
    start = time.perf_counter()
    try:
        spec.run(harness, params)
        if expect_unsupported:
            result.status = FAILED
            result.error = (
                f"supports({spec.op!r}, {dtype.value}) is False, but the operator ran: "
                "declare it supported, or raise UnsupportedOpError"
            )
    except UnsupportedOpError as exc:
        if expect_unsupported:
            result.status = UNSUPPORTED
        else:
            result.status = FAILED
            result.error = f"supports() says yes, but it raised UnsupportedOpError: {exc}"
    except Exception as exc:
        result.status = FAILED
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.error = (
            f"raised {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
            + (" instead of UnsupportedOpError" if expect_unsupported else "")
        )
    result.seconds = time.perf_counter() - start
    result.checks = harness.checks
    result.waivers = sorted(harness.waived)
    if result.status == PASSED and result.failures:
        result.status = FAILED
    return result


class OpSuite:
    """The operator checks of one backend over the requested dtypes."""

    def __init__(
        self,
        backend: Backend,
        dtypes: Sequence[DType],
        seed: int,
        quick: bool = False,
        waivers: Sequence[Waiver] = (),
    ):
        self.backend = backend
        self.dtypes = list(dtypes)
        self.seed = seed
        self.quick = quick
        self.waivers = list(waivers)
        self.results: dict[tuple[str, DType], OpResult] = {}

    def keys(self, ops: Iterable[str] | None = None) -> list[tuple[str, DType]]:
        """(op, dtype) pairs this suite runs: logits operators only in fp32."""
        return self.keys_for(self.dtypes, ops)

    @staticmethod
    def keys_for(
        dtypes: Sequence[DType], ops: Iterable[str] | None = None
    ) -> list[tuple[str, DType]]:
        keys: list[tuple[str, DType]] = []
        for op in ops or checked_ops():
            for dtype in dtypes:
                key = (op, dtype_key(op, dtype))
                if key not in keys:
                    keys.append(key)
        return keys

    def run(self, ops: Iterable[str] | None = None) -> dict[tuple[str, DType], OpResult]:
        for op, dtype in self.keys(ops):
            self.result(op, dtype)
        return self.results

    def result(self, op: str, dtype: DType) -> OpResult:
        """The result of one operator in one dtype, run on first request."""
        key = (op, dtype)
        if key not in self.results:
            self.results[key] = self._run_op(op, dtype)
        return self.results[key]

    def _run_op(self, op: str, dtype: DType) -> OpResult:
        spec = specs()[op]
        indices = spec.quick_indices() if self.quick else range(len(spec.cases))
        if dtype not in self.backend.float_dtypes:
            # The backend does not compute in this dtype at all: nothing to call.
            return OpResult(op, dtype, [], declared_supported=False)
        if op not in MEMORY_OPS and not self.backend.supports(op, dtype):
            # Declared unsupported: the first case must raise UnsupportedOpError.
            case = run_case(self.backend, spec, 0, dtype, self.seed, self.waivers, True)
            return OpResult(op, dtype, [case], declared_supported=False)
        cases = [
            run_case(
                self.backend,
                spec,
                i,
                dtype,
                self.seed,
                self.waivers,
                not declared(self.backend, spec, i, dtype),
            )
            for i in indices
        ]
        return OpResult(op, dtype, cases)
