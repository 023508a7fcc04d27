"""``llm-core plugins``: the listing of backends, as tables and as JSON."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import llm_hal.registry as hal_registry
import pytest
from llm_core.commands import plugins
from llm_core_cpu import CpuBackend
from llm_hal import OPS, Registry

CPU_NATIVE = sorted(CpuBackend().native_ops())


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test discovers anew (and leaves the process-wide registry as it found it)."""
    monkeypatch.setattr(hal_registry, "_default", None)
    for name in ("LLM_CORE_BACKENDS", "LLM_CORE_DISABLED_BACKENDS"):
        monkeypatch.delenv(name, raising=False)
    yield


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="llm-core")
    plugins.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plugins", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def test_tables_show_cpu_available_with_its_native_ops(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys)
    assert code == 0
    assert "cpu" in out and "available" in out and "llm-core" in out
    assert "Automatic choice: cpu" in out
    flat = " ".join(out.split())  # rich wraps long lines
    for op in CPU_NATIVE:
        assert op in flat
    assert "cpu: available" in flat
    assert f"{len(CPU_NATIVE)}/{len(OPS) - len(CPU_NATIVE)}/0" in flat  # native/reference/none


def test_all_ops_lists_every_operator(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, "--all-ops")
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines() if line.count("│") >= 3}
    for op in OPS:
        expected = "native" if op in CPU_NATIVE else "reference"
        assert expected in rows[op].split("│")[2], op


def test_json_document(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["automatic_choice"] == "cpu"
    cpu = next(b for b in doc["backends"] if b["name"] == "cpu")
    assert cpu["available"] and cpu["reason"] is None and cpu["load_error"] is None
    assert cpu["distribution"] == "llm-core" and cpu["hal_api_version"] == doc["hal_api_version"]
    assert cpu["priority"] == 0
    assert cpu["devices"] and cpu["devices"][0]["memory_gib"] > 0
    assert 0 < cpu["memory"]["free_gib"] <= cpu["memory"]["total_gib"]
    assert sorted(cpu["ops"]["native"]) == CPU_NATIVE
    assert cpu["ops"]["unsupported"] == []
    assert sorted(cpu["ops"]["native"] + cpu["ops"]["reference"]) == sorted(OPS)


def test_disabled_backend_is_listed_and_nothing_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deny every installed backend (opencl runs here too when PoCL is installed).
    monkeypatch.setenv("LLM_CORE_DISABLED_BACKENDS", ",".join(Registry().names()))
    code, out = _run(capsys, "--json")
    assert code == 1  # no backend can run here
    doc = json.loads(out)
    cpu = next(b for b in doc["backends"] if b["name"] == "cpu")
    assert not cpu["allowed"] and not cpu["available"]
    assert "LLM_CORE_DISABLED_BACKENDS" in cpu["reason"]
    assert doc["automatic_choice"] is None and cpu["ops"] is None
    code, out = _run(capsys)
    assert code == 1 and "disabled" in out and "No backend can run here" in out


def test_broken_plugin_is_shown_with_its_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "llm_test_cli_broken.py").write_text('raise ImportError("vendor SDK missing")\n')
    info = tmp_path / "llm_test_cli_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: llm-test-cli-broken\nVersion: 0.3\n"
    )
    (info / "entry_points.txt").write_text("[llm_core.backends]\nbroken = llm_test_cli_broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out = _run(capsys, "--json")
    assert code == 0
    broken = next(b for b in json.loads(out)["backends"] if b["name"] == "broken")
    assert broken["distribution"] == "llm-test-cli-broken"
    assert broken["load_error"] == "ImportError: vendor SDK missing"
    assert not broken["available"]
    code, out = _run(capsys)
    assert "failed to load" in out and "vendor SDK missing" in " ".join(out.split())


def test_module_runs_on_its_own() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llm_core.commands.plugins", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = [b["name"] for b in json.loads(done.stdout)["backends"]]
    assert "cpu" in names
