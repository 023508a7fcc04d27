"""Which GPU platform this torch build drives, and whether the CUDA or ROCm backend can run.

A ROCm build of torch keeps the ``cuda`` device name and the ``torch.cuda`` API and sets
``torch.version.hip``; a CUDA build sets ``torch.version.cuda``; a CPU build sets neither. So
the CUDA backend refuses a HIP build and the ROCm backend refuses a CUDA build, whatever
devices are visible. The decisions are pure functions of :class:`GpuFacts`, gathered once by
:func:`gather_facts`, so they are tested on any machine by passing facts in.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from typing import Literal

from llm_hal import Availability, DeviceInfo

Platform = Literal["cuda", "rocm", "cpu"]

#: Oldest compute capability the Triton kernels support (Volta and older lack what they use).
MIN_COMPUTE_CAPABILITY = (7, 5)
#: What to install for each Python package a backend needs.
INSTALL_HINT = {
    "triton": 'pip install "llm-core[cuda]" (Triton)',
    "cupy": 'pip install "llm-core[cuda]" (CuPy: cupy-cuda12x, or cupy-cuda13x for CUDA 13)',
}


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """What the probes look at, read from torch and the driver without touching a device
    more than ``torch.cuda.device_count()`` and the device properties do."""

    torch_version: str
    cuda: str | None  # torch.version.cuda: the CUDA runtime torch was built with
    hip: str | None  # torch.version.hip: set on a ROCm build
    driver_version: int = 0  # cuDriverGetVersion (12040 = CUDA 12.4); 0 = no NVIDIA driver
    devices: tuple[DeviceInfo, ...] = ()
    missing_packages: tuple[str, ...] = ()  # of triton, cupy
    init_error: str = ""  # why torch could not count devices, if it raised


def gpu_platform(cuda: str | None, hip: str | None) -> Platform:
    """The GPU platform of a torch build from ``torch.version.cuda`` / ``torch.version.hip``.
    HIP wins: ROCm builds may carry a CUDA version string for compatibility."""
    if hip:
        return "rocm"
    if cuda:
        return "cuda"
    return "cpu"


def _version_tuple(text: str) -> tuple[int, int]:
    parts = [*(int(p) for p in text.split(".")[:2] if p.isdigit()), 0, 0]
    return parts[0], parts[1]


def driver_cuda_version(driver_version: int) -> tuple[int, int]:
    """cuDriverGetVersion's integer (12040) as (12, 4)."""
    return driver_version // 1000, (driver_version % 1000) // 10


def _missing(facts: GpuFacts, packages: tuple[str, ...]) -> str:
    missing = [p for p in packages if p in facts.missing_packages]
    if not missing:
        return ""
    hints = "; ".join(INSTALL_HINT.get(p, f"pip install {p}") for p in missing)
    return f"{' and '.join(missing)} not installed: {hints}"


def cuda_availability(facts: GpuFacts) -> Availability:
    """Can the CUDA backend run? Every refusal says what is missing and what to do."""
    platform = gpu_platform(facts.cuda, facts.hip)
    if platform == "rocm":
        return Availability.no(
            f"torch {facts.torch_version} is a ROCm build (HIP {facts.hip}): AMD GPUs run on "
            "the rocm backend (--backend rocm), never on cuda"
        )
    if platform == "cpu":
        return Availability.no(
            f"torch {facts.torch_version} was built without CUDA (a CPU-only build): install "
            "a CUDA build of PyTorch (see pytorch.org) to use NVIDIA GPUs"
        )
    assert facts.cuda is not None
    if facts.driver_version <= 0:
        return Availability.no(
            "no NVIDIA driver found (libcuda.so.1 could not be loaded): install the NVIDIA "
            "driver, or run where an NVIDIA GPU is visible"
        )
    have = driver_cuda_version(facts.driver_version)
    need = _version_tuple(facts.cuda)
    # CUDA minor-version compatibility: a driver of the same major version runs any minor.
    if have[0] < need[0]:
        return Availability.no(
            f"the NVIDIA driver is too old: it supports CUDA {have[0]}.{have[1]}, but torch "
            f"{facts.torch_version} was built for CUDA {facts.cuda}; update the driver to one "
            f"for CUDA {need[0]}.x or install a torch build for CUDA {have[0]}"
        )
    if not facts.devices:
        why = f" ({facts.init_error})" if facts.init_error else ""
        return Availability.no(
            f"no CUDA device{why}: the driver sees no GPU; check CUDA_VISIBLE_DEVICES"
        )
    usable = [d for d in facts.devices if _capability(d) >= MIN_COMPUTE_CAPABILITY]
    if not usable:
        cc = ", ".join(
            f"{d.name} (sm_{d.properties.get('compute_capability', '?')})" for d in facts.devices
        )
        lo = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        return Availability.no(f"no GPU with compute capability {lo} or newer: {cc}")
    missing = _missing(facts, ("triton", "cupy"))
    if missing:
        return Availability.no(missing)
    return Availability.yes(usable)


def rocm_availability(facts: GpuFacts) -> Availability:
    """Can the ROCm backend run? Only on a ROCm (HIP) build of torch with a visible GPU."""
    platform = gpu_platform(facts.cuda, facts.hip)
    if platform == "cuda":
        return Availability.no(
            f"torch {facts.torch_version} is a CUDA build (CUDA {facts.cuda}), not ROCm: "
            "NVIDIA GPUs run on the cuda backend"
        )
    if platform == "cpu":
        return Availability.no(
            f"torch {facts.torch_version} is not a ROCm build (torch.version.hip is None): "
            "install the ROCm build of PyTorch (see pytorch.org) to use AMD GPUs"
        )
    if not facts.devices:
        why = f" ({facts.init_error})" if facts.init_error else ""
        return Availability.no(
            f"no AMD GPU visible{why}: check HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES and "
            "that this user may open /dev/kfd and /dev/dri (groups video, render)"
        )
    missing = _missing(facts, ("triton",))
    if missing:
        return Availability.no(missing.replace("llm-core[cuda]", "llm-core[rocm]"))
    return Availability.yes(facts.devices)


def _capability(device: DeviceInfo) -> tuple[int, int]:
    text = device.properties.get("compute_capability", "0.0")
    return _version_tuple(text)


# ----------------------------------------------------------------------------------------------
# reading the facts
# ----------------------------------------------------------------------------------------------


def nvidia_driver_version() -> int:
    """cuDriverGetVersion through libcuda, or 0 when there is no NVIDIA driver. Does not
    create a CUDA context."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return 0
    return int(version.value)


def gather_facts() -> GpuFacts:
    """Read the facts from this process's torch. Cheap, and never raises."""
    import torch

    cuda = getattr(torch.version, "cuda", None)
    hip = getattr(torch.version, "hip", None)
    missing = tuple(p for p in ("triton", "cupy") if importlib.util.find_spec(p) is None)
    platform = gpu_platform(cuda, hip)
    driver = nvidia_driver_version() if platform == "cuda" else 0
    devices: list[DeviceInfo] = []
    error = ""
    if platform != "cpu" and (platform == "rocm" or driver > 0):
        try:
            for i in range(torch.cuda.device_count()):
                devices.append(describe_device(i))
        except Exception as exc:  # a broken driver install raises here
            error = f"{type(exc).__name__}: {exc}"
    return GpuFacts(torch.__version__, cuda, hip, driver, tuple(devices), missing, error)


def describe_device(index: int) -> DeviceInfo:
    """A DeviceInfo for ``torch.cuda`` device ``index`` (NVIDIA or AMD)."""
    import torch

    p = torch.cuda.get_device_properties(index)
    props = {
        "compute_capability": f"{p.major}.{p.minor}",
        "multiprocessors": str(p.multi_processor_count),
    }
    arch = getattr(p, "gcnArchName", "")
    if arch:
        props["gcn_arch"] = str(arch)
    return DeviceInfo(index, str(p.name), int(p.total_memory), props)
