"""``llm-core new-backend``: the packages it writes install, are found, and pass conformance.

Both kinds of package are generated into a temporary folder and pip-installed into
``<tmp>/site`` (``--no-deps --target``: the environment stays untouched); fresh interpreters
find them through ``PYTHONPATH``, as tests/test_discovery.py does with the example package.
Then, in subprocesses:

- ``llm-core plugins --json`` lists both: loaded, built for the current HAL API, available,
  with their operators;
- each package's own tests run. They run ``llm-core conformance --backend NAME --model llama
  --dtype float32 --no-real-model --report DIR`` (every HAL operator, one tiny model, the
  engine audits) and assert on the result; this module then reads the certificates they
  wrote: the torch-device package is CERTIFIED with exit status 0, and the numpy skeleton
  passes the operator level for its own operators with every other one UNSUPPORTED.

The rest runs in-process: the files' contents, and the refusals (bad names, existing folder).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from llm_core.cli import main
from llm_core.commands.new_backend import Plan, compatible_range, render
from llm_hal import HAL_API_VERSION, OPS

TORCH_NAME = "acme_torch"
HOST_NAME = "acme_numpy"
#: What the --host-arrays skeleton implements itself.
HOST_OPS = ["embedding", "linear", "rms_norm", "silu_and_mul", "add", "gather_rows"]
MEMORY_OPS = ["from_host", "to_host", "copy_", "reshape", "split", "allocate_kv_cache"]


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    for name in ("LLM_CORE_BACKENDS", "LLM_CORE_DISABLED_BACKENDS", "LLM_CORE_FALLBACK"):
        env.pop(name, None)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Both packages written by the command and pip-installed into ``<tmp>/site``.

    pip builds in the source folder, so it builds a copy: the generated folders stay as the
    command wrote them.
    """
    root = tmp_path_factory.mktemp("new-backend")
    out, build, site = root / "out", root / "build", root / "site"
    assert main(["new-backend", TORCH_NAME, "--torch-device", "cpu", "--output", str(out)]) == 0
    assert main(["new-backend", HOST_NAME, "--host-arrays", "--output", str(out)]) == 0
    shutil.copytree(out, build)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(site),
         str(build / "llm-core-acme-torch"), str(build / "llm-core-acme-numpy")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    yield {
        "root": root,
        "site": site,
        TORCH_NAME: out / "llm-core-acme-torch",
        HOST_NAME: out / "llm-core-acme-numpy",
    }


def _run_package_tests(installed: dict[str, Path], name: str) -> dict[str, Any]:
    """Run the package's own tests; the certificate its conformance test wrote."""
    package = installed[name]
    basetemp = installed["root"] / f"pytest-{name}"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(package), "--basetemp", str(basetemp), str(package / "tests")],
        env=_env(installed["site"]), cwd=package, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (certificate,) = basetemp.rglob("conformance.json")
    return dict(json.loads(certificate.read_text()))


# -------------------------------------------------------------------------------------------
# installed and run
# -------------------------------------------------------------------------------------------


def test_plugins_lists_both_packages(installed: dict[str, Path]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llm_core.cli", "plugins", "--json"],
        env=_env(installed["site"]), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = {b["name"]: b for b in json.loads(done.stdout)["backends"]}
    torch_backend, host_backend = listed[TORCH_NAME], listed[HOST_NAME]
    for backend, dist in (
        (torch_backend, "llm-core-acme-torch"),
        (host_backend, "llm-core-acme-numpy"),
    ):
        assert backend["load_error"] is None and backend["error"] is None, backend
        assert (backend["distribution"], backend["hal_api_version"]) == (dist, HAL_API_VERSION)
        assert backend["available"] and backend["priority"] == -10
    assert torch_backend["ops"] == {"native": [], "reference": list(OPS), "unsupported": []}
    assert host_backend["ops"]["native"] == [op for op in OPS if op in HOST_OPS]
    assert host_backend["ops"]["unsupported"] == [op for op in OPS if op not in HOST_OPS]


def test_torch_device_package_is_certified(installed: dict[str, Path]) -> None:
    certificate = _run_package_tests(installed, TORCH_NAME)
    assert certificate["request"]["backends"] == [TORCH_NAME]
    assert certificate["request"]["dtypes"] == ["float32"] and not certificate["request"]["quick"]
    (backend,) = certificate["backends"]
    assert backend["status"] == "ran" and backend["api_version"] == HAL_API_VERSION
    assert backend["class"] == "llm_core_acme_torch.backend.AcmeTorchBackend"
    assert {op["status"] for op in backend["ops"]} == {"passed"}
    assert [(c["model"], c["status"]) for c in certificate["cells"]] == [
        ("LlamaForCausalLM", "CERTIFIED")
    ]
    assert certificate["summary"]["exit_status"] == 0


def test_host_arrays_package_passes_its_operators(installed: dict[str, Path]) -> None:
    certificate = _run_package_tests(installed, HOST_NAME)
    (backend,) = certificate["backends"]
    assert backend["class"] == "llm_core_acme_numpy.backend.AcmeNumpyBackend"
    status = {op["op"]: op["status"] for op in backend["ops"] if op["dtype"] == "float32"}
    assert status == {
        op: "passed" if op in MEMORY_OPS + HOST_OPS else "unsupported"
        for op in MEMORY_OPS + list(OPS)
    }
    (cell,) = certificate["cells"]
    assert cell["status"] == "UNSUPPORTED", cell
    assert cell["reasons"][0].startswith("needs operator rotary_embedding")
    assert certificate["summary"]["failed_ops"] == 0


# -------------------------------------------------------------------------------------------
# what is written
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan", [Plan.torch("acme", "xpu"), Plan.host_arrays("acme")], ids=lambda p: p.variant
)
def test_the_files(plan: Plan) -> None:
    files = render(plan)
    assert sorted(files) == [
        ".github/workflows/conformance.yml",
        "README.md",
        "pyproject.toml",
        "src/llm_core_acme/__init__.py",
        "src/llm_core_acme/backend.py",
        "src/llm_core_acme/plugin.py",
        "src/llm_core_acme/py.typed",
        "tests/test_conformance.py",
    ]
    project = tomllib.loads(files["pyproject.toml"])["project"]
    assert project["name"] == "llm-core-acme"
    assert project["dependencies"] == [f"llm-core{compatible_range(_core_version())}"]
    assert project["optional-dependencies"]["test"][0].startswith("llm-core-conformance>=")
    assert project["entry-points"]["llm_core.backends"] == {"acme": "llm_core_acme.plugin"}
    # The HAL version is a literal, the one current now, and passed to the spec by name.
    plugin = ast.parse(files["src/llm_core_acme/plugin.py"])
    literals = {
        node.targets[0].id: node.value.value
        for node in plugin.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        and isinstance(node.targets[0], ast.Name)
    }  # fmt: skip
    assert literals["BUILT_FOR_HAL_API"] == HAL_API_VERSION
    assert "api_version=BUILT_FOR_HAL_API" in files["src/llm_core_acme/plugin.py"]
    used = {n.id for n in ast.walk(plugin) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(plugin) if isinstance(n, ast.Attribute)}
    used |= {a.name for n in ast.walk(plugin) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "HAL_API_VERSION" not in used  # the host's version would defeat the check
    steps = yaml.safe_load(files[".github/workflows/conformance.yml"])["jobs"]["conformance"]
    runs = [step.get("run", "") for step in steps["steps"]]
    assert "llm-core conformance --backend acme --report conformance-report" in runs
    upload = next(s for s in steps["steps"] if s.get("uses", "").startswith("actions/upload-"))
    assert upload["with"]["path"] == "conformance-report/" and upload["if"] == "always()"
    for path, text in files.items():
        if path.endswith(".py"):
            compile(text, path, "exec")


def _core_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("llm-core")


def test_compatible_range() -> None:
    assert compatible_range("0.1.0") == ">=0.1.0,<0.2"
    assert compatible_range("1.4.2") == ">=1.4.2,<1.5"
    assert compatible_range("2.0") == ">=2.0,<2.1"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_generated_code_passes_ruff(installed: dict[str, Path]) -> None:
    for name in (TORCH_NAME, HOST_NAME):
        package = installed[name]
        for command in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
            done = subprocess.run(command, cwd=package, capture_output=True, text=True)
            assert done.returncode == 0, f"{name}: {' '.join(command)}\n{done.stdout}{done.stderr}"


# -------------------------------------------------------------------------------------------
# refusals
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Acme", "1acme", "acme-npu", "acme__npu", "_acme", "acme_", "ac me", "", "cpu"]
)
def test_a_bad_name_is_refused(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new-backend", name, "--output", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("llm-core: error: backend name") and repr(name) in error
    assert list(tmp_path.iterdir()) == []


def test_a_torch_device_with_an_index_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new-backend", "acme", "--torch-device", "xpu:0", "--output", str(tmp_path)]) == 1
    assert "is not a torch device type" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "llm-core-acme"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    assert main(["new-backend", "acme", "--host-arrays", "--output", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "llm-core-acme already exists" in error and "nothing was written" in error
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]
    assert (existing / "mine.txt").read_text() == "keep me"


def test_torch_device_and_host_arrays_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["new-backend", "acme", "--torch-device", "cpu", "--host-arrays",
              "--output", str(tmp_path)])  # fmt: skip
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
