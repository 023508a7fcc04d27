"""``llm-core conformance replay``: one case of a run again, and with ``--traceback`` the full
Python traceback of an exception the case raises (a run keeps only its one-line message)."""

from __future__ import annotations

from typing import ClassVar

import pytest
from llm_conformance.replay import raised_traceback
from llm_core.cli import main
from llm_core_cpu import CpuBackend
from llm_hal import (
    HAL_API_VERSION,
    Availability,
    BackendRecord,
    BackendSpec,
    DType,
    get_registry,
)
from llm_hal.backend import Tensor

SEED = 1234
REPLAY = ["--op", "add", "--case", "0", "--dtype", "float32", "--seed", str(SEED)]


def _launch_add_kernel() -> Tensor:
    raise RuntimeError("kernel launch failed: too many resources requested")


class RaisesInAdd(CpuBackend):
    """``add`` fails deep inside the backend, as a kernel launch that the driver refuses."""

    name: ClassVar[str] = "raises-in-add"

    def add(self, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        return _launch_add_kernel()


@pytest.fixture
def raising_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    """RaisesInAdd, installed in the process's registry as a plugin would be."""
    name = RaisesInAdd.name
    spec = BackendSpec(
        name=name,
        version="0.0",
        api_version=HAL_API_VERSION,
        priority=-100,
        probe=Availability.yes,
        factory=lambda _config: RaisesInAdd(),
    )
    monkeypatch.setitem(
        get_registry().records, name, BackendRecord(name, "tests", "tests", "0.0", spec)
    )
    return name


def run_replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = main(["conformance", "replay", *args])
    return status, capsys.readouterr().out


def test_replay_prints_the_one_line_error_without_traceback(
    raising_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run_replay(capsys, "--backend", raising_backend, *REPLAY)
    assert status == 1
    assert "add case 0 in float32: FAILED" in out
    assert "error: raised RuntimeError: kernel launch failed" in out
    assert "Traceback" not in out


def test_replay_with_traceback_prints_the_full_traceback(
    raising_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run_replay(capsys, "--backend", raising_backend, *REPLAY, "--traceback")
    assert status == 1
    explanation, _, trace = out.partition("  traceback:\n")
    assert "add case 0 in float32: FAILED" in explanation
    assert trace.startswith("Traceback (most recent call last):")
    # every frame from the suite's case down to where the backend raised, then the exception
    assert "llm_conformance" in trace
    assert "in add" in trace and "in _launch_add_kernel" in trace
    assert trace.rstrip().endswith(
        "RuntimeError: kernel launch failed: too many resources requested"
    )


def test_traceback_of_a_case_that_raises_nothing_is_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert raised_traceback(CpuBackend(), "add", 0, DType.FP32, SEED) is None
    status, out = run_replay(capsys, "--backend", "cpu", *REPLAY, "--traceback")
    assert status == 0 and "PASSED" in out and "traceback" not in out
