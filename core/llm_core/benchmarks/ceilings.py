"""MachineCeilings: this machine's measured memory bandwidth and GEMM rate, the roofline that
every speed figure is quoted against.

The probes are host-side measurements (they describe the machine, not a model's data, so
they are plain torch CPU code like the rest of the host bookkeeping): a streaming read of a
buffer much larger than the last-level cache, a copy, and a square fp32 (and bf16) matrix
multiply, each the best of a few repetitions. Run them in the same process, right before
the figures they bound: on a shared machine the ceilings move.
"""

from __future__ import annotations

import contextlib
import mmap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True, slots=True)
class MachineCeilings:
    read_gbs: float  # GB/s (1e9 bytes) streaming reads
    copy_gbs: float  # GB/s counting bytes read + written
    gemm_fp32_gflops: float
    gemm_bf16_gflops: float
    threads: int

    @classmethod
    def measure(
        cls, buffer_mib: int = 256, gemm_n: int = 1024, repeats: int = 5
    ) -> MachineCeilings:
        threads = torch.get_num_threads()
        n = buffer_mib * 2**20 // 4
        read, copy = _stream_times(n, repeats)
        x = torch.randn(gemm_n, gemm_n)
        y = torch.randn(gemm_n, gemm_n)
        flops = 2.0 * gemm_n**3
        fp32 = best_time(lambda: torch.mm(x, y), repeats)
        # Half the size: without AVX512-BF16 torch's bf16 GEMM is slow enough to matter here.
        half = gemm_n // 2
        xb, yb = x[:half, :half].bfloat16(), y[:half, :half].bfloat16()
        bf16 = best_time(lambda: torch.mm(xb, yb), max(1, repeats // 2))
        return cls(
            read_gbs=n * 4 / read / 1e9,
            copy_gbs=2 * n * 4 / copy / 1e9,
            gemm_fp32_gflops=flops / fp32 / 1e9,
            gemm_bf16_gflops=2.0 * half**3 / bf16 / 1e9,
            threads=threads,
        )

    @property
    def bandwidth_gbs(self) -> float:
        """The bandwidth a weight-streaming step can hope for: the better of the two probes
        (a copy moves twice the bytes of a read)."""
        return max(self.read_gbs, self.copy_gbs)

    def decode_roofline(self, bytes_per_step: float, flops_per_step: float, batch: int) -> float:
        """Tokens per second a decode step of ``batch`` sequences cannot beat: it must read
        ``bytes_per_step`` (weights and KV) and do ``flops_per_step`` (fp32 FMA rate)."""
        t_mem = bytes_per_step / (self.bandwidth_gbs * 1e9)
        t_math = flops_per_step / (self.gemm_fp32_gflops * 1e9)
        return batch / max(t_mem, t_math)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _stream_times(n: int, repeats: int) -> tuple[float, float]:
    """Best times to read (the faster of two reductions) and to copy ``n`` fp32 values, on huge
    pages where the OS grants them (as an engine keeps its weights: on 4 KiB pages the same
    stream measured ~25% slower); the buffers are freed after."""
    a, b = _huge_buffer(n), _huge_buffer(n)
    a.fill_(1.0)
    # torch's reductions stream at different rates on different CPUs: take the best of three.
    read = min(best_time(f, repeats) for f in (a.sum, a.amax, lambda: torch.aminmax(a)))
    return read, best_time(lambda: b.copy_(a), repeats)


def _huge_buffer(n: int) -> torch.Tensor:
    """``n`` fp32 values in an anonymous mapping advised to use transparent huge pages."""
    region = mmap.mmap(-1, n * 4)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # THP compiled out: ordinary pages
            region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.float32)
