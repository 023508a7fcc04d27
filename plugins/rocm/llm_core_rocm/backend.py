"""RocmBackend: AMD GPUs through PyTorch's ROCm build and the CUDA backend's Triton kernels.

A ROCm build of torch keeps the ``cuda`` device name, so tensors live on
``torch.device("cuda", i)`` and dense GEMMs go to hipBLASLt through torch. Norms, rotary,
activations, the KV-cache write, paged attention and the sampling draw are the shared Triton
kernels with AMD launch parameters (wavefront 64, see ``ROCM_CONFIG``); the CuPy kernels of
the CUDA backend are not used. Decode steps are recorded as HIP graphs through
``torch.cuda.graph``. Tensor parallelism uses RCCL through torch.distributed's ``nccl``
backend.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from llm_hal.spec import DeviceInfo
from llm_triton.backend import TritonBackend, gpu_device
from llm_triton.kernels import ROCM_CONFIG, KernelConfig
from llm_triton.platform import describe_device

from llm_core_rocm.arch import fp8_dtype, has_native_fp8

#: The torch.distributed backend for collectives: on a ROCm build "nccl" is RCCL.
DISTRIBUTED_BACKEND = "nccl"


class RocmBackend(TritonBackend):
    name: ClassVar[str] = "rocm"

    def __init__(
        self, device_index: int = 0, config: KernelConfig | None = None, graphs: bool = True
    ):
        device, props, sized = gpu_device(device_index, config or ROCM_CONFIG)
        super().__init__(device, sized, graphs)
        self.gcn_arch = str(getattr(props, "gcnArchName", ""))
        self.fp8_dtype = fp8_dtype(self.gcn_arch) if has_native_fp8(self.gcn_arch) else None

    def device_info(self) -> DeviceInfo:
        info = describe_device(self.device.index or 0)
        props = dict(info.properties)
        props.update(
            hip=str(torch.version.hip), fp8=self.fp8_dtype.value if self.fp8_dtype else "none"
        )
        return DeviceInfo(info.index, info.name, info.total_memory, props)
