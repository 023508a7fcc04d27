"""What a plugin tells the HAL about its backend: the spec, availability and devices."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_hal.backend import Backend


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device a backend can run on."""

    index: int
    name: str
    total_memory: int  # bytes; 0 when unknown
    properties: dict[str, str] = field(default_factory=dict)  # driver, compute capability, ...


@dataclass(frozen=True, slots=True)
class Availability:
    """The answer of a backend's probe: can it run here, and if not, why."""

    available: bool
    reason: str = ""  # why it is unavailable; empty when available
    devices: tuple[DeviceInfo, ...] = ()

    @classmethod
    def yes(cls, devices: tuple[DeviceInfo, ...] | list[DeviceInfo] = ()) -> Availability:
        return cls(True, "", tuple(devices))

    @classmethod
    def no(cls, reason: str) -> Availability:
        if not reason:
            raise ValueError("an unavailable backend must say why")
        return cls(False, reason)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """Options the engine hands to a backend factory."""

    device_index: int = 0
    options: dict[str, str] = field(default_factory=dict)  # backend-specific, e.g. platform name


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A plugin's description of one backend, returned from ``llm_core_backends``.

    ``probe`` and ``factory`` must import the vendor SDK lazily: importing the plugin module
    itself must never fail because an SDK is missing.
    """

    name: str  # short lowercase identifier: "cpu", "cuda", "opencl"
    version: str  # the plugin package's version
    api_version: str  # HAL_API_VERSION the plugin was built against
    priority: int  # automatic selection picks the available backend with the highest priority
    probe: Callable[[], Availability]
    factory: Callable[[BackendConfig], Backend]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"backend name {self.name!r} must be a short identifier")
        parts = self.api_version.split(".") if isinstance(self.api_version, str) else []
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(
                f"backend {self.name}: api_version {self.api_version!r} must be the HAL API "
                "version the plugin was written against, as a string 'MAJOR.MINOR' (e.g. '1.2')"
            )


def distribution_version(distribution: str) -> str:
    """The installed version of ``distribution`` (a plugin's own), or "0.0.0+source" when the
    code runs from a source tree that was never installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+source"


def host_cpu_name() -> str:
    """This machine's CPU model ("model name" in /proc/cpuinfo), else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
