"""The Ascend plugin without an NPU: its spec, and a clear reason for each way it cannot run.

This machine has no torch-npu, no CANN and no NPU, so the real probe answers the first reason.
The later checks are functions of what they look at; they get real files (a fake CANN tree in
a temporary folder) and the versions a user could have.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import llm_hal.hookspecs as hookspecs
import pluggy
import pytest
from llm_core_ascend import plugin, probe
from llm_core_ascend.ops import AUTOLOAD_ENV, TORCH_NPU_VERSION
from llm_core_ascend.probe import Environment
from llm_hal import BackendConfig, BackendSpec, BackendUnavailableError, Registry
from llm_hal.hookspecs import PROJECT

TORCH_NPU_INSTALLED = any(
    d.metadata["Name"] in ("torch-npu", "torch_npu") for d in md.distributions()
)


def env(
    torch_version: str = "2.13.0+cpu",
    npu_version: str | None = "2.13.0",
    requires: tuple[str, ...] = ("torch==2.13.0.*", "numpy", "pyyaml"),
    **environ: str,
) -> Environment:
    return Environment(torch_version, npu_version, requires, environ)


# -------------------------------------------------------------------------------------------
# the plugin module
# -------------------------------------------------------------------------------------------


def spec() -> BackendSpec:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    (found,) = pm.hook.llm_core_backends()
    assert isinstance(found, BackendSpec)
    return found


def test_the_spec() -> None:
    s = spec()
    assert (s.name, s.api_version) == ("ascend", "1.1")
    assert s.priority > 0  # an accelerator wins over cpu when it can run


def test_importing_the_plugin_leaves_torch_importable() -> None:
    code = (
        "import os, sys; os.environ.pop('TORCH_DEVICE_BACKEND_AUTOLOAD', None)\n"
        "import llm_core_ascend.plugin\n"
        "assert 'torch_npu' not in sys.modules\n"
        "print(os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"  # a later `import torch` will not autoload torch-npu


@pytest.mark.skipif(TORCH_NPU_INSTALLED, reason="torch-npu is installed here")
def test_the_probe_here_says_torch_npu_is_missing() -> None:
    availability = spec().probe()
    assert not availability.available
    assert "torch-npu is not installed" in availability.reason
    assert 'pip install "llm-core[ascend]"' in availability.reason
    assert "torch_npu" not in sys.modules


@pytest.mark.skipif(TORCH_NPU_INSTALLED, reason="torch-npu is installed here")
def test_the_registry_refuses_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found through the entry point (declared by a dist-info folder where the installation
    does not declare it yet): listed, not chosen automatically, refused with the reason."""
    if "ascend" not in Registry().records:
        info = tmp_path / "llm_core_ascend_entry-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-core-ascend-entry\n")
        (info / "entry_points.txt").write_text(
            "[llm_core.backends]\nascend = llm_core_ascend.plugin\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LLM_CORE_BACKENDS", raising=False)
    monkeypatch.delenv("LLM_CORE_DISABLED_BACKENDS", raising=False)
    registry = Registry()
    assert registry.records["ascend"].loaded
    assert registry.choose().name != "ascend"
    with pytest.raises(BackendUnavailableError, match="backend ascend unavailable: torch-npu is"):
        registry.create("ascend")


def test_the_factory_refuses_unknown_options() -> None:
    with pytest.raises(ValueError, match=r"unknown ascend backend option.*graph.*nz_weights"):
        spec().factory(BackendConfig(options={"graph": "1"}))
    assert "torch_npu" not in sys.modules


# -------------------------------------------------------------------------------------------
# each reason
# -------------------------------------------------------------------------------------------


def test_not_installed() -> None:
    reason = probe.installed_reason(env(npu_version=None))
    assert f"torch-npu {TORCH_NPU_VERSION}" in reason and "llm-core[ascend]" in reason
    assert probe.installed_reason(env()) == ""


@pytest.mark.parametrize(
    ("torch_version", "npu_version", "requires", "ok"),
    [
        ("2.13.0+cpu", "2.13.0", ("torch==2.13.0.*",), True),
        ("2.13.0", "2.13.0.post1", ("torch==2.13.0.*",), True),
        ("2.14.0", "2.13.0", ("torch==2.13.0.*",), False),
        ("2.13.0", "2.12.0rc1", ("torch==2.12.0",), False),
        ("2.13.0+cpu", "2.13.0", (), True),  # no metadata: the release numbers must agree
        ("2.13.1", "2.13.0", (), False),
        ("2.13.0", "2.13.0", ('torch==2.9.0; python_version < "3"',), True),  # marker false
    ],
)
def test_version_mismatch(
    torch_version: str, npu_version: str, requires: tuple[str, ...], ok: bool
) -> None:
    reason = probe.version_reason(env(torch_version, npu_version, requires))
    if ok:
        assert reason == ""
    else:
        assert f"torch-npu {npu_version} requires torch" in reason
        assert f"torch {torch_version} is installed" in reason


def test_no_cann_at_all() -> None:
    if probe.CANN_DEFAULT_HOME.is_dir():
        pytest.skip(f"{probe.CANN_DEFAULT_HOME} exists here")
    reason = probe.cann_reason({}, None)
    assert "CANN toolkit was not found" in reason
    assert "ASCEND_HOME_PATH" in reason and "set_env.sh" in reason


def _cann_tree(root: Path, with_hccl: bool) -> Path:
    home = root / "ascend-toolkit" / "latest"
    (home / "lib64").mkdir(parents=True)
    (home / "x86_64-linux").mkdir()
    (home / "x86_64-linux" / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=8.5.0\n"
    )
    if with_hccl:
        (home / "lib64" / probe.HCCL_LIBRARY).write_bytes(b"\x7fELF")
    return home


def test_cann_installed_but_not_sourced(tmp_path: Path) -> None:
    home = _cann_tree(tmp_path, with_hccl=True)
    reason = probe.cann_reason({"ASCEND_HOME_PATH": str(home)}, None)
    assert "not on LD_LIBRARY_PATH" in reason and str(home.parent / "set_env.sh") in reason
    sourced = {"ASCEND_HOME_PATH": str(home), "LD_LIBRARY_PATH": f"/nowhere:{home / 'lib64'}"}
    assert probe.cann_reason(sourced, None) == ""
    assert probe.cann_reason({}, "libhccl.so") == ""  # found in the ld.so cache
    assert probe.cann_version(home) == "8.5.0"


def test_cann_without_hccl(tmp_path: Path) -> None:
    home = _cann_tree(tmp_path, with_hccl=False)
    reason = probe.cann_reason({"ASCEND_TOOLKIT_HOME": str(home)}, None)
    assert f"at {home} has no lib64/libhccl.so" in reason


def test_import_failure() -> None:
    exc = OSError("libascendcl.so: cannot open shared object file")
    reason = probe.import_reason(exc, env())
    assert "import torch_npu failed (OSError: libascendcl.so" in reason
    assert "torch-npu 2.13.0" in reason and "set_env.sh" in reason


def test_no_device() -> None:
    assert probe.device_reason(1, env()) == ""
    reason = probe.device_reason(0, env(ASCEND_RT_VISIBLE_DEVICES="7"))
    assert "sees no NPU device (ASCEND_RT_VISIBLE_DEVICES=7)" in reason
    assert "npu-smi info" in reason


def test_static_reasons_come_in_order() -> None:
    assert "not installed" in probe.static_reason(env(npu_version=None, torch_version="9.9"))
    assert "requires torch" in probe.static_reason(env(torch_version="2.14.0"))


def test_the_autoload_switch_is_the_one_torch_reads() -> None:
    import torch

    assert f'"{AUTOLOAD_ENV}"' in Path(torch.__file__).read_text()
