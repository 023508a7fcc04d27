"""CUDA C sources of the kernels compiled at run time by NVRTC (through CuPy).

Kept as Python strings so they ship inside the wheel with no package-data rule and can be
compiled without CuPy or a GPU (``llm_core_cuda.nvrtc``), which is how CI checks them.
"""

from __future__ import annotations

#: Options every CUDA C source here is compiled with, at run time and in the tests.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17", "-default-device")

#: The KV-cache write for a cache of the activations' dtype: a pure copy of each token's
#: ``Hkv * D`` elements to its slot, in the widest word that the row size, strides and
#: addresses allow (16, 4 or 2 bytes). One block per token writes both caches, so the step's
#: keys and values are read and written exactly once, in 16-byte transactions where possible.
#: Element types never matter (no conversion), so one kernel per word size serves fp32, fp16
#: and bf16 alike. A conversion (an fp8 cache) goes to the Triton kernel instead.
RESHAPE_AND_CACHE_SOURCE = r"""
#define DEFINE_RESHAPE_AND_CACHE(NAME, WORD)                                                  \
extern "C" __global__ void NAME(                                                            \
    const WORD* __restrict__ key, const WORD* __restrict__ value,                           \
    WORD* __restrict__ key_cache, WORD* __restrict__ value_cache,                           \
    const long long* __restrict__ slot_mapping,                                             \
    long long key_row_stride, long long value_row_stride, int row_words)                    \
{                                                                                           \
    const long long token = blockIdx.x;                                                     \
    const long long slot = slot_mapping[token];                                             \
    if (slot < 0) return; /* a padding token */                                             \
    const WORD* k = key + token * key_row_stride;                                           \
    const WORD* v = value + token * value_row_stride;                                       \
    WORD* kc = key_cache + slot * row_words;                                                \
    WORD* vc = value_cache + slot * row_words;                                              \
    for (int i = threadIdx.x; i < row_words; i += blockDim.x) {                             \
        kc[i] = k[i];                                                                       \
        vc[i] = v[i];                                                                       \
    }                                                                                       \
}

DEFINE_RESHAPE_AND_CACHE(reshape_and_cache_w16, uint4)
DEFINE_RESHAPE_AND_CACHE(reshape_and_cache_w4, unsigned int)
DEFINE_RESHAPE_AND_CACHE(reshape_and_cache_w2, unsigned short)
"""

#: Kernel name in RESHAPE_AND_CACHE_SOURCE for each word size in bytes.
RESHAPE_AND_CACHE_KERNELS: dict[int, str] = {
    16: "reshape_and_cache_w16",
    4: "reshape_and_cache_w4",
    2: "reshape_and_cache_w2",
}
