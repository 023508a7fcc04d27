"""Operator microbenchmarks: fixtures and the summary table.

Run with ``pytest tests/benchmarks --benchmark-only`` (the project's default options skip
benchmarks). Every benchmark records the bytes it moves and the FLOPs it does; at the end a
table prints each one's median time, achieved GB/s and GFLOP/s, and their fraction of this
machine's ceilings (a streaming-read probe and a GEMM probe, measured in the same session).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from llm_core.benchmarks import MachineCeilings
from llm_hal import Backend, get_registry


@dataclass(slots=True)
class OpFigure:
    op: str
    backend: str
    case: str
    seconds: float
    bytes: float
    flops: float

    @property
    def gbs(self) -> float:
        return self.bytes / self.seconds / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9


_FIGURES: list[OpFigure] = []
_CEILINGS: list[MachineCeilings] = []


def available_backends() -> list[tuple[str, Any]]:
    """(id, factory) for every backend usable here; the CPU backend also as "cpu-torch", its
    torch operators without the C kernels, so the kernels' gain is measured too."""
    registry = get_registry()
    found: list[tuple[str, Any]] = []
    for name in registry.names():
        if registry.records[name].availability().available:
            found.append((name, lambda name=name: registry.create(name)))
    if any(name == "cpu" for name, _ in found):
        from llm_core_cpu import CpuBackend

        found.append(("cpu-torch", lambda: CpuBackend(use_kernels=False)))
    return found


_BACKENDS: dict[str, Backend] = {}


@pytest.fixture(scope="session", params=[b[0] for b in available_backends()])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param not in _BACKENDS:
        factory = dict(available_backends())[request.param]
        _BACKENDS[request.param] = factory()
    return _BACKENDS[request.param]


@pytest.fixture(scope="session")
def ceilings() -> MachineCeilings:
    if not _CEILINGS:
        _CEILINGS.append(MachineCeilings.measure())
    return _CEILINGS[0]


@pytest.fixture
def record(request: pytest.FixtureRequest, benchmark: Any) -> Any:
    """``record(op, case, bytes, flops)`` after ``benchmark(...)``: stores the figures in the
    benchmark's extra_info and in the session summary."""
    callspec = getattr(request.node, "callspec", None)  # the probes are not parametrized
    backend_id = callspec.params.get("backend", "-") if callspec else "-"

    def _record(op: str, case: str, nbytes: float, flops: float) -> OpFigure:
        seconds = float(benchmark.stats.stats.median)
        figure = OpFigure(op, str(backend_id), case, seconds, nbytes, flops)
        benchmark.extra_info.update(
            bytes=nbytes, flops=flops, gb_per_s=figure.gbs, gflop_per_s=figure.gflops
        )
        _FIGURES.append(figure)
        return figure

    return _record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    c = _CEILINGS[0] if _CEILINGS else None
    tr = terminalreporter
    tr.section("operator figures against the machine's ceilings")
    if c is not None:
        tr.write_line(
            f"ceilings: read {c.read_gbs:.1f} GB/s, copy {c.copy_gbs:.1f} GB/s, GEMM fp32 "
            f"{c.gemm_fp32_gflops:.0f} GFLOP/s, bf16 {c.gemm_bf16_gflops:.0f} GFLOP/s "
            f"({c.threads} threads)"
        )
    header = f"{'op':<26}{'backend':<11}{'case':<30}{'median':>10}{'GB/s':>8}{'%bw':>6}"
    tr.write_line(header + f"{'GFLOP/s':>9}{'%gemm':>7}")
    for f in _FIGURES:
        bw = f"{f.gbs / c.bandwidth_gbs:6.0%}" if c else "     -"
        gemm = f"{f.gflops / c.gemm_fp32_gflops:7.0%}" if c and f.flops else "      -"
        tr.write_line(
            f"{f.op:<26}{f.backend:<11}{f.case:<30}{f.seconds * 1e6:8.1f}us{f.gbs:8.1f}{bw}"
            f"{f.gflops:9.1f}{gemm}"
        )
