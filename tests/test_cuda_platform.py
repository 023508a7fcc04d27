"""Which GPU backend a machine gets: the CUDA and ROCm probes as pure functions of the facts
they read (torch build, driver, devices, installed packages), and the real probes here.

The rule under test: a CUDA build of torch may get the cuda backend and never rocm; a ROCm
build (``torch.version.hip`` set, same ``cuda`` device name) may get rocm and never cuda; a
CPU build gets neither. Every refusal says why and what to do.
"""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch
from llm_core_cuda import plugin as cuda_plugin
from llm_core_rocm import plugin as rocm_plugin
from llm_hal import HAL_API_VERSION, BackendSpec, DeviceInfo
from llm_hal.version import api_compatible
from llm_triton.options import option_enabled
from llm_triton.platform import (
    GpuFacts,
    cuda_availability,
    gather_facts,
    gpu_platform,
    rocm_availability,
)

H100 = DeviceInfo(0, "NVIDIA H100 80GB HBM3", 85 << 30, {"compute_capability": "9.0"})
P100 = DeviceInfo(0, "Tesla P100", 16 << 30, {"compute_capability": "6.0"})
MI300X = DeviceInfo(
    0,
    "AMD Instinct MI300X",
    192 << 30,
    {"compute_capability": "9.4", "gcn_arch": "gfx942:sramecc+:xnack-"},
)


def facts(cuda=None, hip=None, driver=0, devices=(), missing=(), error="") -> GpuFacts:
    return GpuFacts("2.13.0", cuda, hip, driver, tuple(devices), tuple(missing), error)


@pytest.mark.parametrize(
    ("cuda", "hip", "platform"),
    [
        ("12.8", None, "cuda"),
        (None, "6.4.43482", "rocm"),
        ("12.8", "6.4", "rocm"),
        (None, None, "cpu"),
    ],
)
def test_gpu_platform(cuda, hip, platform):
    assert gpu_platform(cuda, hip) == platform


# Each case: the facts, then (cuda available?, a phrase of its reason), (rocm ..., ...).
SELECTION = [
    pytest.param(
        facts("12.8", None, 12080, [H100]),
        (True, ""),
        (False, "cuda backend"),
        id="cuda-build-h100",
    ),
    pytest.param(
        facts(None, "6.4", 0, [MI300X]), (False, "rocm backend"), (True, ""), id="rocm-build-mi300x"
    ),
    pytest.param(
        facts(None, None),
        (False, "built without CUDA"),
        (False, "not a ROCm build"),
        id="cpu-build",
    ),
    pytest.param(
        facts("12.8", None, 0),
        (False, "no NVIDIA driver"),
        (False, "CUDA build"),
        id="cuda-build-no-driver",
    ),
    pytest.param(
        facts("12.8", None, 11080, [H100]),
        (False, "driver is too old"),
        (False, "CUDA build"),
        id="driver-too-old",
    ),
    pytest.param(
        facts("12.8", None, 12020, [H100]),
        (True, ""),
        (False, "CUDA build"),
        id="older-minor-driver-is-compatible",
    ),
    pytest.param(
        facts("12.8", None, 12080, [], error="CUDA_ERROR_NO_DEVICE"),
        (False, "no CUDA device (CUDA_ERROR_NO_DEVICE)"),
        (False, "CUDA build"),
        id="no-cuda-device",
    ),
    pytest.param(
        facts("12.8", None, 12080, [P100]),
        (False, "compute capability 7.5"),
        (False, "CUDA build"),
        id="gpu-too-old",
    ),
    pytest.param(
        facts("12.8", None, 12080, [H100], ["triton"]),
        (False, "triton not installed"),
        (False, "CUDA build"),
        id="no-triton",
    ),
    pytest.param(
        facts("12.8", None, 12080, [H100], ["cupy"]),
        (False, "cupy-cuda12x"),
        (False, "CUDA build"),
        id="no-cupy",
    ),
    pytest.param(
        facts(None, "6.4", 0, []),
        (False, "ROCm build"),
        (False, "no AMD GPU"),
        id="rocm-build-no-device",
    ),
    pytest.param(
        facts(None, "6.4", 0, [MI300X], ["triton", "cupy"]),
        (False, "ROCm build"),
        (False, "llm-core[rocm]"),
        id="rocm-no-triton-cupy-not-needed",
    ),
]


@pytest.mark.parametrize(("gpu", "cuda_expected", "rocm_expected"), SELECTION)
def test_selection(gpu, cuda_expected, rocm_expected):
    for availability, (ok, phrase) in (
        (cuda_availability(gpu), cuda_expected),
        (rocm_availability(gpu), rocm_expected),
    ):
        assert availability.available is ok, availability.reason
        assert phrase in availability.reason
        if not ok:
            assert availability.reason  # an unavailable backend always says why
    # Never both: the two GPU backends split the torch builds between them.
    assert not (cuda_availability(gpu).available and rocm_availability(gpu).available)


def test_available_backends_report_their_devices():
    assert cuda_availability(facts("12.8", None, 12080, [P100, H100])).devices == (H100,)
    assert rocm_availability(facts(None, "6.4", 0, [MI300X])).devices == (MI300X,)


def test_facts_of_this_machine():
    here = gather_facts()
    assert here.torch_version == torch.__version__
    assert here.cuda == torch.version.cuda and here.hip == torch.version.hip
    if gpu_platform(here.cuda, here.hip) == "cpu":
        assert here.devices == () and here.driver_version == 0


def test_real_probes_agree_with_this_build():
    cuda, rocm = cuda_plugin.probe(), rocm_plugin.probe()
    platform = gpu_platform(torch.version.cuda, torch.version.hip)
    assert not (cuda.available and rocm.available)
    if platform == "cpu":
        assert "built without CUDA" in cuda.reason
        assert "not a ROCm build" in rocm.reason
    elif platform == "rocm":
        assert not cuda.available
    else:
        assert not rocm.available


@pytest.mark.parametrize(("module", "name"), [(cuda_plugin, "cuda"), (rocm_plugin, "rocm")])
def test_plugin_specs(module, name):
    spec = module.llm_core_backends()
    assert isinstance(spec, BackendSpec)
    assert spec.name == name and spec.priority > 0
    assert api_compatible(spec.api_version, HAL_API_VERSION)
    assert spec.probe is module.probe and spec.factory is module.factory


def test_plugin_modules_import_no_gpu_sdk():
    """Discovery must stay cheap and never fail for a missing SDK: the plugin modules import
    neither Triton nor CuPy (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, llm_core_cuda.plugin, llm_core_rocm.plugin\n"
        "bad = [m for m in ('triton', 'cupy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_gpu_backends_with_reasons():
    names = {ep.name for ep in md.entry_points(group="llm_core.backends")}
    if not {"cuda", "rocm"} <= names:
        pytest.skip("the cuda/rocm entry points are not installed in this environment yet")
    from llm_hal import Registry

    registry = Registry()
    for name in ("cuda", "rocm"):
        record = registry.records[name]
        assert record.loaded, record.error
        expected = cuda_plugin.probe() if name == "cuda" else rocm_plugin.probe()
        assert record.availability().available is expected.available
        assert record.availability().reason == expected.reason


def test_cuda_options(monkeypatch):
    from llm_hal import BackendConfig

    monkeypatch.delenv("LLM_CORE_CUDA_GRAPHS", raising=False)
    assert option_enabled(BackendConfig(), "cuda_graphs")
    assert not option_enabled(BackendConfig(options={"cuda_graphs": "off"}), "cuda_graphs")
    monkeypatch.setenv("LLM_CORE_CUDA_CUPY", "0")
    assert not option_enabled(BackendConfig(), "cupy")
