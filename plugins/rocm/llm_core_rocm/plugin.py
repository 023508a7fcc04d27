"""Entry-point module of the ROCm backend: the spec pluggy discovers.

The probe accepts only a ROCm (HIP) build of torch: on a CUDA build the cuda backend is the
one, and the two never both claim a machine (see ``llm_triton.platform``).
"""

from __future__ import annotations

from llm_hal import Availability, BackendConfig, BackendSpec, hookimpl
from llm_hal.backend import Backend

from llm_core_rocm.version import __version__

#: The HAL API this plugin was built and tested against (a literal, not the host's version).
BUILT_FOR_HAL_API = "1.1"  # 1.1: capture_graph (CUDA graphs of decode steps)


def probe() -> Availability:
    from llm_triton.platform import gather_facts, rocm_availability

    return rocm_availability(gather_facts())


def factory(config: BackendConfig) -> Backend:
    from llm_triton.options import option_enabled

    from llm_core_rocm.backend import RocmBackend

    return RocmBackend(config.device_index, graphs=option_enabled(config, "cuda_graphs"))


@hookimpl
def llm_core_backends() -> BackendSpec:
    return BackendSpec(
        name="rocm",
        version=__version__,
        api_version=BUILT_FOR_HAL_API,
        priority=100,  # an AMD GPU beats the CPU whenever it is usable
        probe=probe,
        factory=factory,
        description="AMD GPUs: PyTorch ROCm + the shared Triton kernels, HIP graphs, RCCL",
    )
