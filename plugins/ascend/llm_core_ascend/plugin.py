"""Entry-point module of the Ascend backend: the spec pluggy discovers.

Importing it imports only ``llm_hal`` and the standard library: torch-npu is imported by the
probe (:mod:`llm_core_ascend.probe`) and the factory, when the backend is looked at or used.
It also turns torch's autoload of torch-npu off for later ``import torch`` calls (see
:func:`llm_core_ascend.ops.keep_torch_importable`).
"""

from __future__ import annotations

from llm_hal import Availability, BackendConfig, BackendSpec, hookimpl
from llm_hal.backend import Backend

from llm_core_ascend.ops import keep_torch_importable
from llm_core_ascend.version import __version__

#: The HAL API this plugin was built and tested against (a literal, so the registry's check
#: compares it with the host's).
BUILT_FOR_HAL_API = "1.1"

#: ``BackendConfig.options`` the factory understands, with what each does.
OPTIONS = {
    "nz_weights": "1: keep dense linear weights in the NPU's FRACTAL_NZ layout (default 0)",
}

keep_torch_importable()


def probe() -> Availability:
    from llm_core_ascend.probe import probe as run_probe

    return run_probe()


def factory(config: BackendConfig) -> Backend:
    """Import torch-npu and build the backend on ``npu:<device_index>``."""
    unknown = sorted(set(config.options) - set(OPTIONS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
        raise ValueError(f"unknown ascend backend option(s) {', '.join(unknown)}; known: {known}")
    from llm_core_ascend import ops
    from llm_core_ascend.backend import AscendBackend

    return AscendBackend(
        f"npu:{config.device_index}",
        ops=ops.load(),
        nz_weights=config.options.get("nz_weights", "0") == "1",
    )


@hookimpl
def llm_core_backends() -> BackendSpec:
    return BackendSpec(
        name="ascend",
        version=__version__,
        api_version=BUILT_FOR_HAL_API,
        priority=80,  # an accelerator: preferred to cpu (0) wherever an NPU is usable
        probe=probe,
        factory=factory,
        description="Huawei Ascend NPU: torch-npu fused operators (CANN), HCCL collectives",
    )
