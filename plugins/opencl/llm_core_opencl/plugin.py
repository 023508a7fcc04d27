"""Entry-point module of the OpenCL backend: the spec pluggy discovers.

pyopencl is imported only inside the probe and the factory, so this module loads anywhere; the
probe says why the backend cannot run (pyopencl missing, no OpenCL platform, no device matching
the selector).
"""

from __future__ import annotations

from llm_hal import Availability, BackendConfig, BackendSpec, DeviceInfo, hookimpl
from llm_hal.backend import Backend

from llm_core_opencl.version import __version__

#: The HAL API this plugin was written and tested against: a literal, so that the registry
#: can refuse it when the host's HAL is incompatible (it must never be the host's version).
BUILT_FOR_HAL_API = "1.3"  # 1.2: apply_token_bitmask; 1.3: gemma_rms_norm, scale, soft_cap


def _probe() -> Availability:
    from llm_core_opencl.device import (
        DeviceSelectionError,
        list_devices,
        matching,
        selector_from_env,
    )

    try:
        devices = list_devices()
    except DeviceSelectionError as exc:
        return Availability.no(str(exc))
    selector = selector_from_env()
    chosen = matching(selector, devices)
    if not chosen:
        here = "; ".join(c.label for c in devices)
        what = f"the selector {selector!r}" if selector else "the automatic choice (no simulators)"
        return Availability.no(f"no OpenCL device matches {what}; devices here: {here}")
    return Availability.yes(
        [
            DeviceInfo(i, c.label, int(c.device.global_mem_size), {"platform": c.platform_name})
            for i, c in enumerate(chosen)
        ]
    )


def _factory(config: BackendConfig) -> Backend:
    from llm_core_opencl.backend import OpenCLBackend

    options = config.options
    unknown = set(options) - {"device", "flavour"}
    if unknown:
        raise ValueError(
            f"unknown OpenCL backend option(s) {', '.join(sorted(unknown))}; "
            "known: device=SELECTOR (e.g. pocl or 1:0), flavour=cpu|gpu"
        )
    return OpenCLBackend(options.get("device"), config.device_index, options.get("flavour"))


@hookimpl
def llm_core_backends() -> BackendSpec:
    return BackendSpec(
        name="opencl",
        version=__version__,
        api_version=BUILT_FOR_HAL_API,
        # Below the CPU backend: on a CPU-only machine PoCL is slower than torch, so OpenCL runs
        # only when asked for (--backend opencl).
        priority=-5,
        probe=_probe,
        factory=_factory,
        description="OpenCL C kernels through PyOpenCL (any OpenCL 1.2+ device; PoCL on CPUs)",
    )
