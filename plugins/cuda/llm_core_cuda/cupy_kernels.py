"""Hand-written CUDA C kernels run through CuPy: compiled by NVRTC at first use, launched on
torch's current stream, with tensors passed by DLPack (zero-copy, no extension to build).

Launching on torch's stream keeps the kernels ordered with torch's own work and lets a CUDA
graph capture them like any other launch.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_core_cuda.cuda_sources import (
    NVRTC_OPTIONS,
    RESHAPE_AND_CACHE_KERNELS,
    RESHAPE_AND_CACHE_SOURCE,
)

_THREADS = 128


def word_size(row_bytes: int, *strides_and_pointers: int) -> int | None:
    """The widest copy word (16, 4 or 2 bytes) that divides the row size and every stride
    and address, or None if not even 2 does."""
    for word in (16, 4, 2):
        if row_bytes % word == 0 and all(x % word == 0 for x in strides_and_pointers):
            return word
    return None


def _row_bytes(cache: torch.Tensor, item: int) -> int:
    """Bytes of one token's row (all KV heads) in a ``(blocks, block_size, Hkv, D)`` cache."""
    return cache.shape[2] * cache.shape[3] * item


class CupyKernels:
    """The compiled CuPy module of one device, and launchers that take torch tensors."""

    def __init__(self, device_index: int):
        import cupy

        self._cupy = cupy
        self.device_index = device_index
        with cupy.cuda.Device(device_index):
            self._module = cupy.RawModule(code=RESHAPE_AND_CACHE_SOURCE, options=NVRTC_OPTIONS)
            self._kernels = {
                w: self._module.get_function(n) for w, n in RESHAPE_AND_CACHE_KERNELS.items()
            }

    def _as_cupy(self, t: torch.Tensor) -> Any:
        return self._cupy.from_dlpack(t.detach())

    def reshape_and_cache_word(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> int | None:
        """The copy word of :meth:`reshape_and_cache` for these tensors, or None when the
        kernel does not apply: it needs no dtype conversion, dense caches and rows aligned to
        at least 2 bytes."""
        same = key.dtype == value.dtype == key_cache.dtype == value_cache.dtype
        if not same or not (key_cache.is_contiguous() and value_cache.is_contiguous()):
            return None
        if key.stride(-1) != 1 or value.stride(-1) != 1:
            return None
        item = key.element_size()
        return word_size(
            _row_bytes(key_cache, item),
            key.stride(0) * item,
            value.stride(0) * item,
            key.data_ptr(),
            value.data_ptr(),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
        )

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        word: int,
    ) -> None:
        """The HAL's ``reshape_and_cache`` for same-dtype caches; slot_mapping: (T,) int64 on
        the device; word: what :meth:`reshape_and_cache_word` returned for these tensors."""
        tokens = key.shape[0]
        if tokens == 0:
            return
        item = key.element_size()
        row_bytes = _row_bytes(key_cache, item)
        cp = self._cupy
        stream = torch.cuda.current_stream(key.device)
        with cp.cuda.Device(self.device_index), cp.cuda.ExternalStream(stream.cuda_stream):
            args = (
                self._as_cupy(key),
                self._as_cupy(value),
                self._as_cupy(key_cache),
                self._as_cupy(value_cache),
                self._as_cupy(slot_mapping),
                cp.int64(key.stride(0) * item // word),
                cp.int64(value.stride(0) * item // word),
                cp.int32(row_bytes // word),
            )
            self._kernels[word]((tokens,), (_THREADS,), args)
