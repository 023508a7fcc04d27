"""CudaBackend: NVIDIA GPUs through PyTorch CUDA, Triton kernels, CuPy kernels and CUDA graphs.

What runs where: dense linear layers on cuBLAS (``torch``); rms_norm (with the fused residual
add), rotary, gated activations, paged attention prefill and split-K decode, and the sampling
draw in Triton (shared with ROCm); the KV-cache write for same-dtype caches in hand-written
CUDA C through CuPy (fp8 caches use the Triton kernel, which converts); decode steps as CUDA
graphs per batch-size bucket (:meth:`capture_decode`). Everything else is the reference's
torch code on the GPU.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from llm_hal import AttentionMetadata, DType
from llm_hal.spec import DeviceInfo
from llm_triton.backend import TritonBackend, gpu_device
from llm_triton.kernels import CUDA_CONFIG, KernelConfig
from llm_triton.platform import describe_device, driver_cuda_version, nvidia_driver_version

from llm_core_cuda.cupy_kernels import CupyKernels


def fp8_kv_dtype(capability: tuple[int, int]) -> DType | None:
    """The fp8 KV-cache format of an NVIDIA GPU: OCP e4m3fn from Ada/Hopper (sm_89) on,
    none before (Triton has no fp8 e4m3 conversions there)."""
    return DType.FP8_E4M3FN if capability >= (8, 9) else None


class CudaBackend(TritonBackend):
    name: ClassVar[str] = "cuda"

    def __init__(
        self,
        device_index: int = 0,
        config: KernelConfig | None = None,
        use_cupy: bool = True,
        graphs: bool = True,
    ):
        device, props, sized = gpu_device(device_index, config or CUDA_CONFIG)
        super().__init__(device, sized, graphs)
        self.capability = (int(props.major), int(props.minor))
        self.fp8_dtype = fp8_kv_dtype(self.capability)
        self.cupy = CupyKernels(device_index) if use_cupy else None

    def device_info(self) -> DeviceInfo:
        info = describe_device(self.device.index or 0)
        major, minor = driver_cuda_version(nvidia_driver_version())
        props = dict(info.properties)
        props.update(
            driver_cuda=f"{major}.{minor}",
            torch_cuda=str(torch.version.cuda),
            cupy="on" if self.cupy is not None else "off",
            cuda_graphs="on" if self.graphs_enabled else "off",
        )
        return DeviceInfo(info.index, info.name, info.total_memory, props)

    def supports(self, op: str, dtype: DType | None = None, **shape: int) -> bool:
        if dtype is DType.BF16 and self.capability < (8, 0):
            return False  # bf16 arithmetic needs Ampere or newer
        return super().supports(op, dtype, **shape)

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        if self.cupy is not None:
            word = self.cupy.reshape_and_cache_word(key, value, key_cache, value_cache)
            if word is not None:
                slots = self.attention_inputs(meta).slot_mapping
                self.cupy.reshape_and_cache(key, value, key_cache, value_cache, slots, word)
                return
        super().reshape_and_cache(key, value, key_cache, value_cache, meta)
