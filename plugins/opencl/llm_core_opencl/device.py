"""Finding the OpenCL device to run on, by platform/device name or index, and saying why not.

A selector is ``"P:D"`` (platform index, device index, as ``clinfo -l`` and
:func:`list_devices` number them) or a case-insensitive substring of ``"<platform> <device>
<vendor> <device version>"`` (``"pocl"``, ``"nvidia"``, ``"gfx90a"``). Without one, the
automatic choice ranks GPUs first, then accelerators, then CPUs, and skips simulators
(Oclgrind) unless named. When several devices match, ``index`` picks among them in that order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: Environment variable holding a device selector (BackendConfig.options["device"] wins).
ENV_DEVICE = "LLM_CORE_OPENCL_DEVICE"

#: Devices that only simulate OpenCL: never chosen automatically, far too slow to serve.
SIMULATORS = ("oclgrind",)


class DeviceSelectionError(RuntimeError):
    """No usable OpenCL device; the message says why and what to do."""


@dataclass(frozen=True)
class Candidate:
    """One OpenCL device and where it sits in the platform list."""

    platform_index: int
    device_index: int
    platform_name: str
    device: Any  # pyopencl.Device

    @property
    def label(self) -> str:
        return (
            f"{self.platform_index}:{self.device_index} {self.platform_name} / {self.device.name}"
        )

    @property
    def haystack(self) -> str:
        """What a name selector is matched against. PoCL's platform is "Portable Computing
        Language": the device version ("OpenCL 3.0 PoCL ...") is what says "pocl"."""
        d = self.device
        return f"{self.platform_name} {d.name} {d.vendor} {d.version}".lower()

    @property
    def is_simulator(self) -> bool:
        return any(s in self.haystack for s in SIMULATORS)

    @property
    def rank(self) -> int:
        """0 for GPUs, 1 accelerators, 2 CPUs, 3 anything else (lower is preferred)."""
        import pyopencl as cl

        kind = int(self.device.type)
        for rank, flag in enumerate(
            (cl.device_type.GPU, cl.device_type.ACCELERATOR, cl.device_type.CPU)
        ):
            if kind & int(flag):
                return rank
        return 3

    @property
    def kind(self) -> str:
        return ("GPU", "accelerator", "CPU", "other")[self.rank]


def import_pyopencl() -> Any:
    try:
        import pyopencl
    except ImportError as exc:
        raise DeviceSelectionError(
            f'pyopencl is not installed ({exc}); install it with `pip install "llm-core[opencl]"`'
        ) from None
    return pyopencl


def list_devices() -> list[Candidate]:
    """Every device of every OpenCL platform, in platform order."""
    cl = import_pyopencl()
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:
        raise DeviceSelectionError(
            f"no OpenCL platform found ({exc}): the ICD loader found no driver; install one, "
            "e.g. `pip install pocl-binary-distribution` (PoCL, runs on the CPU)"
        ) from None
    found = []
    for p, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except cl.Error:  # a platform with no device of any type
            devices = []
        found += [Candidate(p, d, platform.name.strip(), dev) for d, dev in enumerate(devices)]
    if not found:
        raise DeviceSelectionError(
            "OpenCL platforms are installed but none has a device: "
            + ", ".join(p.name for p in platforms)
        )
    return found


def selector_from_env(option: str | None = None) -> str:
    """The selector in effect: ``option`` (from BackendConfig) or the environment variable."""
    return (option or os.environ.get(ENV_DEVICE, "")).strip()


def matching(selector: str, devices: list[Candidate]) -> list[Candidate]:
    """The devices a selector names, best first."""
    if selector:
        head, sep, tail = selector.partition(":")
        if sep and head.strip().isdigit() and tail.strip().isdigit():
            p, d = int(head), int(tail)
            return [c for c in devices if (c.platform_index, c.device_index) == (p, d)]
        wanted = selector.lower()
        chosen = [c for c in devices if wanted in c.haystack]
    else:
        chosen = [c for c in devices if not c.is_simulator]
    return sorted(chosen, key=lambda c: c.rank)


def select_device(selector: str = "", index: int = 0) -> Candidate:
    """The device to run on; raises :class:`DeviceSelectionError` saying why there is none."""
    devices = list_devices()
    chosen = matching(selector, devices)
    available = "; ".join(c.label for c in devices)
    if not chosen:
        what = f"the selector {selector!r}" if selector else "the automatic choice (no simulators)"
        raise DeviceSelectionError(
            f"no OpenCL device matches {what}; devices here: {available}. "
            f"Set {ENV_DEVICE} to 'P:D' or to part of a platform or device name"
        )
    if not 0 <= index < len(chosen):
        raise DeviceSelectionError(
            f"device index {index} is out of range: {len(chosen)} device(s) match "
            f"{selector or '(automatic)'}: " + "; ".join(c.label for c in chosen)
        )
    return chosen[index]
