"""CpuGraph: a decode step recorded as a list of C kernel calls, replayed by one native call.

While the CPU backend captures, each kernel call it makes is also appended here with its
arguments (raw pointers, sizes, scalars) and the tensors and metadata objects behind those
pointers, which the graph keeps alive. ``replay()`` hands the packed list to ``llm_run`` in
the C library: no Python runs between kernels, which at batch 1 is most of the difference
between an eager step and the memory-bandwidth roofline.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from llm_hal.backend import CapturedGraph

from llm_core_cpu.native import KINDS, SIGNATURES, NativeKernels, Record

log = logging.getLogger("llm_core_cpu")

_POINTER, _FLOATS = ctypes.c_void_p, (ctypes.c_float, ctypes.c_double)


class CpuGraph(CapturedGraph):
    def __init__(self, kernels: NativeKernels):
        self._kernels = kernels
        self._calls: list[tuple[str, tuple[Any, ...]]] = []
        self._keep: list[Any] = []
        self._records: Any = None
        self.failure: str | None = None

    def __len__(self) -> int:
        return len(self._calls)

    def record(self, kernel: str, args: tuple[Any, ...], keep: tuple[Any, ...]) -> None:
        """Append a call of ``kernel`` (a key of ``native.SIGNATURES``); ``keep`` holds the
        objects that own the memory its pointer arguments point into."""
        self._calls.append((kernel, args))
        self._keep.extend(keep)

    def fail(self, reason: str) -> None:
        """Something ran that replay would not rerun: the capture is unusable."""
        if self.failure is None:
            self.failure = reason

    def finish(self) -> CpuGraph | None:
        """Pack the calls for ``llm_run``; None (with the reason logged) if the capture failed."""
        if self.failure is not None:
            log.info("CPU backend: decode step not captured: %s", self.failure)
            return None
        records = (Record * len(self._calls))()
        for rec, (kernel, args) in zip(records, self._calls):
            rec.kind = KINDS[kernel]
            ip = ii = fi = 0
            for ctype, value in zip(SIGNATURES[kernel], args, strict=True):
                if ctype is _POINTER:
                    rec.p[ip] = value or 0
                    ip += 1
                elif ctype in _FLOATS:
                    rec.f[fi] = float(value)
                    fi += 1
                else:
                    rec.i[ii] = int(value)
                    ii += 1
        self._records = records
        return self

    def replay(self) -> None:
        self._kernels.run(self._records, len(self._calls))
