"""Entry-point module of the CUDA backend: the spec pluggy discovers.

Importing it imports neither torch's CUDA runtime, Triton nor CuPy: the probe reads facts
(:mod:`llm_triton.platform`) and the factory imports the backend.
"""

from __future__ import annotations

from llm_hal import Availability, BackendConfig, BackendSpec, hookimpl
from llm_hal.backend import Backend
from llm_triton.options import option_enabled

from llm_core_cuda.version import __version__

#: The HAL API this plugin was built and tested against (a literal, not the host's version).
BUILT_FOR_HAL_API = "1.1"  # 1.1: capture_graph (CUDA graphs of decode steps)


def probe() -> Availability:
    from llm_triton.platform import cuda_availability, gather_facts

    return cuda_availability(gather_facts())


def factory(config: BackendConfig) -> Backend:
    from llm_core_cuda.backend import CudaBackend

    return CudaBackend(
        config.device_index,
        use_cupy=option_enabled(config, "cupy"),
        graphs=option_enabled(config, "cuda_graphs"),
    )


@hookimpl
def llm_core_backends() -> BackendSpec:
    return BackendSpec(
        name="cuda",
        version=__version__,
        api_version=BUILT_FOR_HAL_API,
        priority=100,  # an NVIDIA GPU beats the CPU whenever it is usable
        probe=probe,
        factory=factory,
        description="NVIDIA GPUs: PyTorch CUDA + Triton and CuPy kernels, CUDA graphs",
    )
