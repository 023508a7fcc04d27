"""Entry-point module of the example backend: the hook llm-core's registry calls.

Importing this module must never fail because a device SDK is missing, so it imports only
``llm_hal``. The SDK (here: the torch device runtime) is imported inside ``probe`` and
``factory``; a missing or unusable one becomes "backend example unavailable: <why>".
"""

from __future__ import annotations

import os

from llm_hal import Availability, BackendConfig, BackendSpec, DeviceInfo, hookimpl
from llm_hal.backend import Backend

from llm_core_example import __version__

#: The HAL API this plugin was built and tested against. A literal on purpose: importing
#: ``llm_hal.HAL_API_VERSION`` here would always equal the host's and defeat the check.
BUILT_FOR_HAL_API = "1.0"

#: Which torch device type the backend drives: "cpu" (the default), "xpu", "mps", ...
ENV_DEVICE = "LLM_CORE_EXAMPLE_DEVICE"


def _device_type() -> str:
    return os.environ.get(ENV_DEVICE, "cpu").strip() or "cpu"


def probe() -> Availability:
    """Can the backend run here? Answers with the reason when not; never raises."""
    try:
        import torch  # this example's "vendor SDK": imported only when asked
    except ImportError as exc:
        return Availability.no(f"PyTorch is not installed ({exc}); run `pip install torch`")
    device = _device_type()
    if device == "cpu":
        from llm_hal.reference import host_memory_info

        return Availability.yes([DeviceInfo(0, "cpu", host_memory_info().total)])
    runtime = getattr(torch, device, None)
    if runtime is None or not hasattr(runtime, "is_available"):
        return Availability.no(f"{ENV_DEVICE}={device}, but torch {torch.__version__} has no "
                               f"such device type")  # fmt: skip
    if not runtime.is_available():
        return Availability.no(f"{ENV_DEVICE}={device}, but torch {torch.__version__} sees no "
                               f"{device} device (check the driver)")  # fmt: skip
    return Availability.yes(
        [DeviceInfo(i, f"{device}:{i}", 0) for i in range(runtime.device_count())]
    )


def factory(config: BackendConfig) -> Backend:
    """Build the backend for one device; the only place the backend module is imported."""
    from llm_core_example.backend import ExampleBackend

    device = _device_type()
    return ExampleBackend(device if device == "cpu" else f"{device}:{config.device_index}")


@hookimpl
def llm_core_backends() -> BackendSpec:
    return BackendSpec(
        name="example",
        version=__version__,
        api_version=BUILT_FOR_HAL_API,
        priority=-10,  # below the built-in cpu backend (0): used only when asked for by name
        probe=probe,
        factory=factory,
        description="example third-party backend: the reference operators, silu_and_mul replaced",
    )
