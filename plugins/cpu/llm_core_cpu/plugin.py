"""Entry-point module of the CPU backend: the spec pluggy discovers."""

from __future__ import annotations

from llm_hal import Availability, BackendConfig, BackendSpec, DeviceInfo, hookimpl
from llm_hal.backend import Backend
from llm_hal.spec import host_cpu_name

from llm_core_cpu.version import __version__

#: The HAL API this plugin was written and tested against: a literal, so that the registry
#: can refuse it when the host's HAL is incompatible (it must never be the host's version).
BUILT_FOR_HAL_API = "1.2"  # 1.2: apply_token_bitmask (guided decoding)


def _probe() -> Availability:
    from llm_hal.reference import host_memory_info

    name = host_cpu_name()
    return Availability.yes([DeviceInfo(0, name, host_memory_info().total,
                                        {"threads": str(_threads())})])  # fmt: skip


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _factory(config: BackendConfig) -> Backend:
    from llm_core_cpu.backend import CpuBackend

    return CpuBackend()


@hookimpl
def llm_core_backends() -> BackendSpec:
    return BackendSpec(
        name="cpu",
        version=__version__,
        api_version=BUILT_FOR_HAL_API,
        priority=0,  # the last resort: any accelerator that is available wins
        probe=_probe,
        factory=_factory,
        description="PyTorch CPU kernels (fp32, bf16); the default backend",
    )
