"""Triton kernels of the CUDA backend, shared with the ROCm backend, and their launchers.

Importing this package imports Triton. Every launcher takes torch tensors and a
:class:`KernelConfig` and follows the semantics of the HAL operator of the same name; the
kernels use portable Triton only, so one source serves NVIDIA (warp 32) and AMD (wavefront
64). Under ``TRITON_INTERPRET=1`` they run on CPU tensors, which is how the tests check them.
"""

from llm_triton.kernels.activation import gelu_and_mul, silu_and_mul
from llm_triton.kernels.attention_decode import (
    choose_num_splits,
    paged_attention_decode,
)
from llm_triton.kernels.attention_prefill import paged_attention_prefill
from llm_triton.kernels.config import (
    CUDA_CONFIG,
    INTERPRETER_CONFIG,
    ROCM_CONFIG,
    KernelConfig,
)
from llm_triton.kernels.kv_cache import reshape_and_cache
from llm_triton.kernels.norm import rms_norm
from llm_triton.kernels.rotary import rotary_embedding
from llm_triton.kernels.sampling import exponential_race

__all__ = [
    "CUDA_CONFIG",
    "INTERPRETER_CONFIG",
    "ROCM_CONFIG",
    "KernelConfig",
    "choose_num_splits",
    "exponential_race",
    "gelu_and_mul",
    "paged_attention_decode",
    "paged_attention_prefill",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
]
