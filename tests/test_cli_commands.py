"""Subcommands that other distributions plug into ``llm-core`` (entry point group
``llm_core.commands``), as the conformance suite does: found, run, and reported when broken."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from llm_core import cli

COMMAND = """
def add_parser(subparsers):
    parser = subparsers.add_parser("hello", help="say hello")
    parser.add_argument("--name", default="world")
    parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)
"""


Distribution = Callable[[str, str, dict[str, str]], None]


@pytest.fixture
def distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Distribution]:
    """Writes a distribution declaring ``llm_core.commands`` entry points (``name = target``)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(module: str, source: str, entries: dict[str, str]) -> None:
        (tmp_path / f"{module}.py").write_text(source)
        info = tmp_path / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
        (info / "entry_points.txt").write_text(f"[{cli.COMMAND_GROUP}]\n{lines}")

    yield write
    for name in list(sys.modules):
        if name.startswith("llm_test_cmd_"):
            del sys.modules[name]


def test_a_plugged_command_runs(
    distribution: Distribution, capsys: pytest.CaptureFixture[str]
) -> None:
    distribution("llm_test_cmd_hello", COMMAND, {"hello": "llm_test_cmd_hello:add_parser"})
    assert cli.main(["hello", "--name", "vendor"]) == 0
    assert capsys.readouterr().out == "hello vendor\n"


def test_a_broken_command_is_reported_and_the_others_work(  # type: ignore[no-untyped-def]
    distribution, capsys: pytest.CaptureFixture[str]
) -> None:
    distribution(
        "llm_test_cmd_broken", "import vendor_cli_sdk\n", {"broken": "llm_test_cmd_broken:x"}
    )
    assert cli.main(["broken", "--anything"]) == 2
    err = capsys.readouterr().err
    assert "llm-core broken: the command failed to load (llm_test_cmd_broken:x)" in err
    assert "ModuleNotFoundError" in err and "vendor_cli_sdk" in err
    assert cli.main(["plugins", "--json"]) == 0  # built-in commands are unaffected


def test_conformance_comes_from_the_suite_distribution() -> None:
    """The engine does not import the suite: the command is the suite's entry point."""
    parser = cli.build_parser()
    args = parser.parse_args(["conformance", "--backend", "cpu"])
    assert args.func.__module__ == "llm_conformance.cli"
