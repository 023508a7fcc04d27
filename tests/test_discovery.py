"""Backend discovery through the ``llm_core.backends`` entry point, with real distributions.

The example package (examples/llm-core-example-backend) is pip-installed into a temporary
folder and found by a fresh interpreter with no edit to this repo. The other plugins are tiny
distributions written as ``<name>.dist-info`` folders into a temporary ``sys.path`` entry:
``importlib.metadata`` finds them exactly as it finds installed wheels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from llm_hal import (
    HAL_API_VERSION,
    BackendLoadError,
    BackendUnavailableError,
    Registry,
    TorchBackend,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llm-core-example-backend"

# -------------------------------------------------------------------------------------------
# the third-party example, installed for real
# -------------------------------------------------------------------------------------------

# One interpreter (torch imports once): what the registry finds, then the example's own tests.
PROBE_SCRIPT = """
import importlib.metadata, json, os, sys
import pytest, torch
from llm_hal import Registry, TorchBackend
from llm_core.commands.plugins import collect

registry = Registry()
record = registry.records["example"]
backend = registry.create("example")
x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
found = {
    "error": record.error,
    "distribution": record.distribution,
    "dist_version": record.dist_version,
    "location": str(importlib.metadata.distribution(record.distribution).locate_file("")),
    "api_version": record.spec.api_version,
    "priority": record.spec.priority,
    "class": type(backend).__module__ + "." + type(backend).__name__,
    "native_ops": sorted(backend.native_ops()),
    "same_as_reference": torch.equal(backend.silu_and_mul(x), TorchBackend().silu_and_mul(x)),
    "automatic": registry.choose().name,
    "plugins": collect(registry),
}
os.environ["LLM_CORE_EXAMPLE_DEVICE"] = "nosuchdevice"
try:
    Registry().create("example")
except Exception as exc:
    found["no_device"] = f"{type(exc).__name__}: {exc}"
del os.environ["LLM_CORE_EXAMPLE_DEVICE"]
tests = sys.argv[1]
found["tests_exit"] = int(pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", tests, tests]))
print("\\nRESULT " + json.dumps(found))
"""


def _env_with(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    for name in ("LLM_CORE_BACKENDS", "LLM_CORE_DISABLED_BACKENDS", "LLM_CORE_EXAMPLE_DEVICE"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def example() -> dict[str, Any]:
    """The example pip-installed into ``<tmp>/site``, then probed by a fresh interpreter.

    pip builds in the source folder, so it builds a copy in ``<tmp>/src``: the repo stays
    clean, and the environment is untouched.
    """
    with tempfile.TemporaryDirectory(prefix="llm-core-example-") as tmp:
        root = Path(tmp)
        source, site = root / "src", root / "site"
        shutil.copytree(
            EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--no-index", "--disable-pip-version-check", "--target", str(site), str(source)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", PROBE_SCRIPT, str(source / "tests")],
            env=_env_with(site), capture_output=True, text=True, timeout=300, cwd=root,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        found: dict[str, Any] = json.loads(done.stdout.split("\nRESULT ")[-1])
        found["site"] = str(site.resolve())
        found["output"] = done.stdout
        return found


def test_example_is_discovered_without_editing_this_repo(example: dict[str, Any]) -> None:
    assert example["error"] == ""
    assert example["distribution"] == "llm-core-example-backend"
    assert example["dist_version"] == "0.1.0"
    assert str(Path(example["location"]).resolve()) == example["site"]  # the temp install
    assert (example["api_version"], example["priority"]) == ("1.0", -10)
    assert example["class"] == "llm_core_example.backend.ExampleBackend"
    assert example["native_ops"] == ["silu_and_mul"]
    assert example["same_as_reference"]
    assert example["automatic"] == "cpu"  # priority 0 beats the example's -10
    listed = {b["name"]: b for b in example["plugins"]["backends"]}
    assert listed["example"]["available"]
    assert listed["example"]["ops"]["native"] == ["silu_and_mul"]
    assert not listed["example"]["ops"]["unsupported"]


def test_example_unavailable_device_gives_the_reason(example: dict[str, Any]) -> None:
    message = example["no_device"]
    assert message.startswith("BackendUnavailableError: backend example unavailable: ")
    assert "LLM_CORE_EXAMPLE_DEVICE=nosuchdevice" in message


def test_example_own_tests_pass(example: dict[str, Any]) -> None:
    assert example["tests_exit"] == 0, example["output"]
    assert " passed" in example["output"]


# -------------------------------------------------------------------------------------------
# tiny plugins as dist-info folders
# -------------------------------------------------------------------------------------------

PLUGIN = '''
"""A test plugin: backend {name!r}."""
from llm_hal import Availability, BackendSpec, TorchBackend, hookimpl


class Backend_{name}(TorchBackend):
    name = {name!r}


def probe():
    {probe}


def factory(config):
    {factory}


@hookimpl
def llm_core_backends():
    return BackendSpec(name={name!r}, version="1.2.3", api_version={api!r},
                       priority={priority}, probe=probe, factory=factory)
'''

WritePlugin = Callable[..., str]


@pytest.fixture
def write_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WritePlugin]:
    """Writes one distribution per call into a temporary ``sys.path`` entry."""
    modules: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("LLM_CORE_BACKENDS", "LLM_CORE_DISABLED_BACKENDS"):
        monkeypatch.delenv(name, raising=False)

    def write(
        name: str,
        api: str = HAL_API_VERSION,
        priority: int = 5,
        probe: str = "return Availability.yes()",
        factory: str = "return Backend_{name}()",
        source: str | None = None,
    ) -> str:
        module = f"llm_test_plugin_{name}"
        body = source or PLUGIN.format(
            name=name, api=api, priority=priority, probe=probe, factory=factory.format(name=name)
        )
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
        info = tmp_path / f"llm_test_{name}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: llm-test-{name}\nVersion: 1.2.3\n"
        )
        (info / "entry_points.txt").write_text(f"[llm_core.backends]\n{name} = {module}\n")
        modules.append(module)
        return module

    yield write
    for module in modules:
        sys.modules.pop(module, None)


def test_a_plugin_is_found_and_created(write_plugin: WritePlugin) -> None:
    write_plugin("alpha", priority=3)
    registry = Registry()
    record = registry.records["alpha"]
    assert record.loaded, record.error
    assert (record.distribution, record.dist_version) == ("llm-test-alpha", "1.2.3")
    assert record.entry_point == "llm_test_plugin_alpha"
    backend = registry.create("alpha")
    assert isinstance(backend, TorchBackend) and backend.name == "alpha"
    x = torch.randn(2, 8)
    assert torch.equal(backend.silu_and_mul(x), TorchBackend().silu_and_mul(x))
    assert "cpu" in registry.names()  # the built-in backend is found the same way


def test_other_hal_api_version_is_refused_and_listed(write_plugin: WritePlugin) -> None:
    write_plugin("future", api="2.0", priority=1000)
    registry = Registry()
    assert "future" in registry.names()
    error = registry.records["future"].error
    assert "HAL API 2.0" in error and f"HAL API {HAL_API_VERSION}" in error
    with pytest.raises(BackendUnavailableError, match=r"2\.0") as err:
        registry.create("future")
    assert HAL_API_VERSION in str(err.value)
    assert registry.choose().name != "future"  # never chosen, whatever its priority


def test_newer_minor_version_is_refused_older_minor_accepted(write_plugin: WritePlugin) -> None:
    major, minor = (int(x) for x in HAL_API_VERSION.split("."))
    write_plugin("newer", api=f"{major}.{minor + 1}")
    registry = Registry()
    assert not registry.records["newer"].loaded
    assert f"{major}.{minor + 1}" in registry.records["newer"].error


def test_plugin_whose_import_fails_is_listed_with_its_error(write_plugin: WritePlugin) -> None:
    write_plugin("broken", source="raise ImportError(\"No module named 'vendor_sdk'\")\n")
    registry = Registry()
    record = registry.records["broken"]
    assert not record.loaded
    assert record.error == "ImportError: No module named 'vendor_sdk'"
    with pytest.raises(BackendUnavailableError, match="vendor_sdk"):
        registry.create("broken")


def test_misspelled_hook_is_an_error_not_a_silent_skip(write_plugin: WritePlugin) -> None:
    source = (
        "from llm_hal import hookimpl\n\n\n@hookimpl\ndef llm_core_backend():\n    return None\n"
    )
    write_plugin("typo", source=source)
    record = Registry().records["typo"]
    assert not record.loaded
    assert "llm_core_backend" in record.error


def test_hook_returning_something_else_is_listed(write_plugin: WritePlugin) -> None:
    source = (
        "from llm_hal import hookimpl\n\n\n@hookimpl\ndef llm_core_backends():\n    return 'cpu'\n"
    )
    write_plugin("odd", source=source)
    registry = Registry()
    bad = [r for r in registry.records.values() if r.entry_point == "llm_test_plugin_odd"]
    assert len(bad) == 1 and "not a BackendSpec" in bad[0].error


def test_unavailable_probe_gives_its_reason(write_plugin: WritePlugin) -> None:
    write_plugin(
        "nodev",
        probe='return Availability.no("no device found (driver 1.2 is older than 2.0)")',
        factory='raise AssertionError("the factory of an unavailable backend must not run")',
    )
    registry = Registry()
    assert registry.records["nodev"].loaded
    with pytest.raises(BackendUnavailableError) as err:
        registry.create("nodev")
    assert (
        str(err.value)
        == "backend nodev unavailable: no device found (driver 1.2 is older than 2.0)"
    )


def test_crashing_probe_counts_as_unavailable(write_plugin: WritePlugin) -> None:
    write_plugin("crashy", probe='raise RuntimeError("driver segfault avoided")')
    with pytest.raises(BackendUnavailableError, match="probe raised RuntimeError: driver"):
        Registry().create("crashy")


def test_failing_factory_is_one_clear_error(write_plugin: WritePlugin) -> None:
    write_plugin("nosdk", factory='raise ImportError("libvendor.so: cannot open shared object")')
    with pytest.raises(
        BackendLoadError, match="backend nosdk failed to start: ImportError: libvendor"
    ):
        Registry().create("nosdk")


def test_automatic_choice_is_the_highest_priority_available(write_plugin: WritePlugin) -> None:
    write_plugin("fast", priority=50)
    write_plugin("faster", priority=100, probe='return Availability.no("no device")')
    write_plugin("slow", priority=-5)
    registry = Registry()
    assert registry.choose().name == "fast"
    assert registry.create().name == "fast"


def test_allow_list_restricts_the_choice(
    write_plugin: WritePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plugin("fast", priority=50)
    monkeypatch.setenv("LLM_CORE_BACKENDS", "cpu, slow")
    registry = Registry()
    assert registry.choose().name == "cpu"
    with pytest.raises(BackendUnavailableError, match="not in LLM_CORE_BACKENDS"):
        registry.create("fast")


def test_deny_list_removes_a_backend(
    write_plugin: WritePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plugin("fast", priority=50)
    monkeypatch.setenv("LLM_CORE_DISABLED_BACKENDS", "fast")
    registry = Registry()
    assert registry.choose().name == "cpu"
    with pytest.raises(BackendUnavailableError, match="listed in LLM_CORE_DISABLED_BACKENDS"):
        registry.create("fast")
    # Deny everything installed (opencl runs here too when PoCL is installed).
    monkeypatch.setenv("LLM_CORE_DISABLED_BACKENDS", ",".join(Registry().names()))
    with pytest.raises(BackendUnavailableError, match="no backend can run here") as err:
        registry.choose()
    assert "cpu: listed in LLM_CORE_DISABLED_BACKENDS" in str(err.value)


def test_unknown_backend_name_says_what_is_installed(write_plugin: WritePlugin) -> None:
    write_plugin("alpha")
    with pytest.raises(BackendUnavailableError, match="no such backend is installed") as err:
        Registry().create("no-such-backend")
    assert "alpha" in str(err.value) and "cpu" in str(err.value)


def test_hook_that_raises_is_listed_and_the_others_still_load(write_plugin: WritePlugin) -> None:
    source = (
        "from llm_hal import hookimpl\n\n\n@hookimpl\ndef llm_core_backends():\n"
        "    raise RuntimeError('vendor runtime 7 not initialised')\n"
    )
    write_plugin("raiser", source=source)
    write_plugin("fine")
    registry = Registry()
    record = registry.records["raiser"]
    assert not record.loaded
    assert record.error == "RuntimeError: vendor runtime 7 not initialised"
    assert not record.availability().available
    assert "vendor runtime 7" in record.availability().reason
    assert registry.records["fine"].loaded and registry.records["cpu"].loaded


def test_each_plugin_is_asked_through_the_pluggy_hook(write_plugin: WritePlugin) -> None:
    """Discovery calls the hook through pluggy's relay (a monitor sees one call per plugin)."""
    write_plugin("seen")
    calls: list[set[str]] = []
    original = Registry._specs_of

    def monitored(self: Registry, name: str, module: object) -> list[object]:
        undo = self.plugin_manager.add_hookcall_monitoring(
            lambda hook_name, impls, kwargs: calls.append({i.plugin_name for i in impls}),
            lambda outcome, hook_name, impls, kwargs: None,
        )
        try:
            return original(self, name, module)
        finally:
            undo()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Registry, "_specs_of", monitored)
        registry = Registry()
    assert registry.records["seen"].loaded
    assert {"seen"} in calls and {"cpu"} in calls  # each plugin's hook alone, through pluggy


# -------------------------------------------------------------------------------------------
# every plugin of this repository declares the HAL version it was written against
# -------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _entry_point_modules() -> list[tuple[str, Path]]:
    """(backend name, source file) of every ``llm_core.backends`` entry point in the tree."""
    import tomllib

    found = []
    for pyproject in sorted(ROOT.glob("**/pyproject.toml")):
        if ".git" in pyproject.parts or "build" in pyproject.parts:
            continue
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        for name, target in project.get("entry-points", {}).get("llm_core.backends", {}).items():
            module = target.split(":")[0].replace(".", "/") + ".py"
            hits = [p for p in pyproject.parent.glob(f"**/{module}") if "build" not in p.parts]
            assert len(hits) == 1, f"{pyproject}: entry point {name} = {target} not found"
            found.append((name, hits[0]))
    return found


def declared_api_version(source: str) -> str | None:
    """The literal HAL version a plugin module hands to ``BackendSpec(api_version=...)``:
    a string constant, or a module-level name bound to one; None for anything else."""
    import ast

    tree = ast.parse(source)
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "api_version":
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
            if isinstance(node.value, ast.Name):
                return constants.get(node.value.id)
    return None


def test_every_plugin_declares_its_hal_version_as_a_literal() -> None:
    plugins = _entry_point_modules()
    assert {name for name, _ in plugins} >= {"cpu", "opencl", "cuda", "rocm", "ascend", "example"}
    for name, path in plugins:
        version = declared_api_version(path.read_text())
        assert version is not None, f"{path}: api_version must be a literal such as '1.1'"
        major, minor = (int(x) for x in version.split("."))
        assert (major, minor) >= (1, 0), f"{name}: {version}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('BackendSpec(name="a", api_version="1.1")', "1.1"),
        ('V = "1.0"\nBackendSpec(api_version=V)', "1.0"),
        ("from llm_hal import HAL_API_VERSION\nBackendSpec(api_version=HAL_API_VERSION)", None),
        ("BackendSpec(api_version=compute())", None),
    ],
)
def test_declared_api_version_reads_only_literals(source: str, expected: str | None) -> None:
    assert declared_api_version(source) == expected


@pytest.mark.parametrize("api", ["1", "one.two", "1.2.3"])
def test_malformed_hal_version_is_listed_and_the_others_still_load(
    write_plugin: WritePlugin, api: str
) -> None:
    write_plugin("odd_version", api=api)
    registry = Registry()
    record = registry.records["odd_version"]
    assert not record.loaded
    assert "must be the HAL API version" in record.error and repr(api) in record.error
    assert registry.records["cpu"].loaded


def test_newer_minor_is_told_to_upgrade_llm_core(write_plugin: WritePlugin) -> None:
    major, minor = (int(x) for x in HAL_API_VERSION.split("."))
    write_plugin("ahead", api=f"{major}.{minor + 1}")
    error = Registry().records["ahead"].error
    assert f"upgrade llm-core to a release with HAL API {major}.{minor + 1}" in error
