"""How fast the OpenCL backend's GEMM runs against what its device can do: ``python -m
llm_core_opencl.bench``.

Measures, in one run (so that the ratios hold on a noisy machine): the device's fp32 FMA peak
and read bandwidth as OpenCL C reaches them (kernels/bench.cl), the backend's ``linear`` (both
kernel flavours) at decode, prefill and square shapes, and numpy and torch fp32 matmuls of the
same shapes on the host. Prints a Markdown table; GFLOP/s are 2 * M * N * K / seconds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

#: (M, N, K): SmolLM2-135M's MLP up-projection at decode (1 and 8 sequences) and at a
#: 128-token prefill, then a square 1024^3.
SHAPES = [(1, 3072, 576), (8, 3072, 576), (128, 3072, 576), (1024, 1024, 1024)]


def _best(fn: Callable[[], object], sync: Callable[[], object], min_time: float = 0.5) -> float:
    """The best seconds per call over repeats filling about ``min_time``, after a warm-up."""
    fn()
    sync()
    best, spent = float("inf"), 0.0
    while spent < min_time:
        t = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return best


def device_ceilings(backend: object) -> tuple[float, float]:
    """(fp32 GFLOP/s of independent float8 FMA chains, read GB/s) on the backend's device."""
    import pyopencl as cl

    be = backend
    fma = be.programs.kernel("bench.cl", "fma_peak", mad=True)  # type: ignore[attr-defined]
    items, iterations = 4096 * int(be.device.max_compute_units), 2048  # type: ignore[attr-defined]
    out = be.empty((items,), _fp32())  # type: ignore[attr-defined]

    def run_fma() -> None:
        fma.set_args(out.data, np.int32(iterations))
        cl.enqueue_nd_range_kernel(be.queue, fma, (items,), None)  # type: ignore[attr-defined]

    sync = be.synchronize  # type: ignore[attr-defined]
    peak = items * iterations * 128 / _best(run_fma, sync) / 1e9
    n_float8, per_item = (128 << 20) // 32, 4096  # 128 MiB of fp32
    data = be.from_host(np.ones(n_float8 * 8, dtype=np.float32))  # type: ignore[attr-defined]
    sums = be.empty((n_float8 // per_item,), _fp32())  # type: ignore[attr-defined]
    read = be.programs.kernel("bench.cl", "read_sum")  # type: ignore[attr-defined]

    def run_read() -> None:
        read.set_args(data.data, np.int32(per_item), sums.data)
        cl.enqueue_nd_range_kernel(be.queue, read, (n_float8 // per_item,), None)  # type: ignore[attr-defined]

    bandwidth = n_float8 * 32 / _best(run_read, sync) / 1e9
    return peak, bandwidth


def _nothing() -> None:
    return None


def _fp32() -> object:
    from llm_hal import DType

    return DType.FP32


def main(argv: list[str] | None = None) -> int:
    from llm_core_opencl.backend import OpenCLBackend

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default=None,
        help="device selector (default: LLM_CORE_OPENCL_DEVICE, else automatic)",
    )
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    args = parser.parse_args(argv)

    cpu_kernels = OpenCLBackend(args.device, flavour="cpu")
    gpu_kernels = OpenCLBackend(args.device, flavour="gpu")
    peak, bandwidth = device_ceilings(cpu_kernels)
    info = cpu_kernels.device_info()
    print(f"device: {info.name} ({info.properties['type']}, {info.properties['driver']})")
    print(f"device ceilings via OpenCL C: fp32 FMA {peak:.1f} GFLOP/s, read {bandwidth:.1f} GB/s")
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| M x N x K | opencl cpu-flavour | opencl gpu-flavour | numpy | torch | "
          "cpu-flavour / peak | cpu-flavour / torch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for m, n, k in SHAPES:
        flops = 2.0 * m * n * k
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        calls: list[tuple[Callable[[], object], Callable[[], object]]] = [
            (
                partial(be.linear, be.from_host(x), be.prepare_linear(be.from_host(w))),
                be.synchronize,
            )
            for be in (cpu_kernels, gpu_kernels)
        ]
        calls += [
            (partial(np.matmul, x, w.T), _nothing),
            (partial(torch.matmul, tx, tw.T), _nothing),
        ]
        rates = [flops / _best(fn, sync, args.min_time) for fn, sync in calls]
        g = [r / 1e9 for r in rates]
        print(f"| {m} x {n} x {k} | {g[0]:.2f} | {g[1]:.2f} | {g[2]:.1f} | {g[3]:.1f} | "
              f"{g[0] / peak:.0%} | {g[0] / g[3]:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
