"""The repository's distributions: one version, pinned extras, and wheels that hold what they say.

- every pyproject.toml carries the same version, and every pin on a distribution of this
  repository is ``==`` that version;
- each extra of llm-core pulls the plugin distribution of the same name;
- the built wheels: llm-core holds the engine, the HAL and the CPU backend and declares only
  the cpu backend; each plugin wheel holds its own package and nothing that is test support;
- in a fresh virtual environment, the llm-core and llm-core-opencl wheels list exactly cpu and
  opencl, ``llm-core conformance`` says how to get the suite, and once the suite's wheel is
  installed it certifies both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]

#: distribution -> (folder, import packages its wheel must hold exactly)
DISTRIBUTIONS = {
    "llm-core": (".", {"llm_core", "llm_hal", "llm_core_cpu"}),
    "llm-core-opencl": ("plugins/opencl", {"llm_core_opencl"}),
    "llm-core-triton": ("plugins/triton", {"llm_triton"}),
    "llm-core-cuda": ("plugins/cuda", {"llm_core_cuda"}),
    "llm-core-rocm": ("plugins/rocm", {"llm_core_rocm"}),
    "llm-core-ascend": ("plugins/ascend", {"llm_core_ascend"}),
    "llm-core-conformance": ("conformance", {"llm_conformance"}),
}

#: extra of llm-core -> the distribution it must pull
EXTRAS = {
    "opencl": "llm-core-opencl",
    "cuda": "llm-core-cuda",
    "rocm": "llm-core-rocm",
    "ascend": "llm-core-ascend",
    "conformance": "llm-core-conformance",
}

#: Names that test support goes by; no shipped module may carry one.
TEST_SUPPORT = re.compile(r"(^|/)(tests?|.*emulat\w*|fake\w*|mock\w*|dummy\w*)(\.py|/)")


def _project(folder: str) -> dict:
    return tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]


def _our_pins(requirements: list[str]) -> dict[str, str]:
    """``name -> specifier`` of the requirements on a distribution of this repository."""
    pins = {}
    for requirement in requirements:
        match = re.match(r"\s*(llm-core(?:-[a-z]+)?)(\[[^\]]*\])?\s*([^;]*)", requirement)
        if match and match.group(1) in DISTRIBUTIONS:
            pins[match.group(1)] = match.group(3).strip()
    return pins


def test_every_folder_with_a_pyproject_is_a_known_distribution() -> None:
    folders = {
        str(p.parent.relative_to(ROOT))
        for p in ROOT.glob("**/pyproject.toml")
        if not {".git", "build", "examples"} & set(p.relative_to(ROOT).parts)
    }
    assert folders == {folder for folder, _ in DISTRIBUTIONS.values()}
    for name, (folder, _) in DISTRIBUTIONS.items():
        assert _project(folder)["name"] == name


def test_one_version_and_every_internal_pin_is_exact() -> None:
    version = _project(".")["version"]
    for name, (folder, _) in DISTRIBUTIONS.items():
        project = _project(folder)
        assert project["version"] == version, f"{name} is {project['version']}, not {version}"
        requirements = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            requirements += extra
        for dependency, specifier in _our_pins(requirements).items():
            assert specifier == f"=={version}", f"{name} pins {dependency}{specifier}"


def test_each_extra_pulls_its_plugin_distribution() -> None:
    extras = _project(".")["optional-dependencies"]
    for extra, distribution in EXTRAS.items():
        assert distribution in _our_pins(extras[extra]), f"[{extra}] must pull {distribution}"
    assert not _our_pins(_project(".")["dependencies"]), "llm-core alone pulls no plugin"


# -------------------------------------------------------------------------------------------
# built wheels
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every distribution built as a wheel, as a user's ``pip install ./folder`` would."""
    out = tmp_path_factory.mktemp("wheels")
    for folder, _ in DISTRIBUTIONS.values():
        scratch = ROOT / folder / "build"
        existed = scratch.exists()
        try:
            subprocess.run(
                [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
                cwd=ROOT / folder,
                check=True,
                capture_output=True,
            )
        finally:
            if not existed:  # setuptools' copies of the sources would shadow them in greps
                shutil.rmtree(scratch, ignore_errors=True)
    built = {}
    for wheel in out.glob("*.whl"):
        name = wheel.name.split("-")[0].replace("_", "-")
        built[name] = wheel
    assert set(built) == set(DISTRIBUTIONS), sorted(built)
    return built


def _wheel_entry_points(wheel: zipfile.ZipFile) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    files = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    group = ""
    for line in wheel.read(files[0]).decode().splitlines() if files else []:
        if line.startswith("["):
            group = line.strip("[]")
        elif "=" in line:
            groups.setdefault(group, set()).add(line.split("=")[0].strip())
    return groups


def test_wheels_hold_their_packages_and_no_test_support(wheels: dict[str, Path]) -> None:
    for name, (_, packages) in DISTRIBUTIONS.items():
        with zipfile.ZipFile(wheels[name]) as wheel:
            files = [n for n in wheel.namelist() if ".dist-info/" not in n]
            assert {n.split("/")[0] for n in files} == packages, name
            # Templates of `llm-core new-backend` include a test for the generated package.
            support = [n for n in files if TEST_SUPPORT.search(n) and not n.endswith(".tmpl")]
            assert not support, f"{name} ships test support: {support}"


def test_only_plugin_wheels_declare_backends(wheels: dict[str, Path]) -> None:
    declared = {}
    for name, path in wheels.items():
        with zipfile.ZipFile(path) as wheel:
            declared[name] = _wheel_entry_points(wheel).get("llm_core.backends", set())
    assert declared == {
        "llm-core": {"cpu"},
        "llm-core-opencl": {"opencl"},
        "llm-core-triton": set(),  # shared kernels, not a backend
        "llm-core-cuda": {"cuda"},
        "llm-core-rocm": {"rocm"},
        "llm-core-ascend": {"ascend"},
        "llm-core-conformance": set(),
    }


# -------------------------------------------------------------------------------------------
# a user's fresh environment
# -------------------------------------------------------------------------------------------


def _run(venv_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [str(venv_dir / "bin" / args[0]), *args[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def test_fresh_venv_with_core_and_opencl_wheels_lists_and_certifies_both(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    """What a user of built wheels sees: exactly cpu and opencl, both certified."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    _run(env_dir, "pip", "install", "-q", "torch==2.13.0")  # the CPU wheel, before the rest
    _run(env_dir, "pip", "install", "-q", str(wheels["llm-core"]), str(wheels["llm-core-opencl"]))

    listed = json.loads(_run(env_dir, "llm-core", "plugins", "--json").stdout)
    assert sorted(b["name"] for b in listed["backends"]) == ["cpu", "opencl"]
    assert all(b["available"] for b in listed["backends"]), listed

    missing = _run(env_dir, "llm-core", "conformance", check=False)
    assert missing.returncode == 2
    assert 'pip install "llm-core[conformance]"' in missing.stderr

    # The extra, resolved from the built wheels (they are not on an index).
    _run(
        env_dir, "pip", "install", "-q", "--find-links", str(wheels["llm-core"].parent),
        f"{wheels['llm-core']}[conformance]",
    )  # fmt: skip
    report = tmp_path / "report"
    run = _run(
        env_dir, "llm-core", "conformance", "--backend", "cpu,opencl", "--model", "llama",
        "--dtype", "float32", "--no-real-model", "--quick", "--report", str(report), "-q",
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    certificate = json.loads((report / "conformance.json").read_text())
    states = {(c["backend"], c["status"]) for c in certificate["cells"]}
    assert states == {("cpu", "CERTIFIED"), ("opencl", "CERTIFIED")}, states
