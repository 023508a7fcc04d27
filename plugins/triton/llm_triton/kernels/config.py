"""Launch parameters of the Triton kernels, per platform.

The kernels themselves are portable (no CUDA-only intrinsics, no warp-size assumptions); what
differs between NVIDIA (warp 32) and AMD (wavefront 64) is how many warps a program gets and
how large the tiles are. A backend holds one :class:`KernelConfig` and passes it to every
launcher; tests use tiny tiles so that block boundaries are crossed at tiny shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, slots=True)
class KernelConfig:
    warp_size: int = 32
    #: Query rows per program of the prefill kernel, and keys per inner iteration.
    prefill_block_m: int = 64
    prefill_block_n: int = 64
    #: Keys per inner iteration of the decode kernel.
    decode_block_n: int = 64
    #: Upper bound on the split-K factor of decode; splits are chosen to fill the device.
    max_splits: int = 32
    #: Streaming multiprocessors (compute units on AMD): the split heuristic aims at 2 waves.
    num_sms: int = 132
    attention_num_warps: int = 4
    attention_num_stages: int = 2
    elementwise_num_warps: int = 4
    #: Columns per program of the elementwise kernels (norm, activations, cache write).
    elementwise_block: int = 1024

    def with_device(self, num_sms: int) -> KernelConfig:
        return replace(self, num_sms=max(1, num_sms))


#: NVIDIA: 4 warps of 32 threads per program; 64x64 tiles fit sm_80/sm_90 shared memory.
CUDA_CONFIG = KernelConfig()

#: AMD CDNA: a wavefront is 64 lanes, so 4 "warps" are 256 lanes; one software-pipelining
#: stage suits the AMD Triton backend's stream pipeliner better than two for these loops.
ROCM_CONFIG = KernelConfig(
    warp_size=64,
    prefill_block_m=64,
    prefill_block_n=32,
    decode_block_n=32,
    num_sms=304,
    attention_num_stages=1,
)

#: The Triton interpreter (TRITON_INTERPRET=1, CPU tensors): the smallest tiles ``tl.dot``
#: accepts, so tests cross tile and split boundaries with a few dozen tokens.
INTERPRETER_CONFIG = KernelConfig(
    prefill_block_m=16,
    prefill_block_n=16,
    decode_block_n=16,
    max_splits=8,
    num_sms=1,
    elementwise_block=64,
)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def require_interpreter() -> None:
    """Fail loudly unless Triton runs in interpreter mode in this process.

    The mode is fixed when ``triton.language`` is first imported (its ``@triton.jit``
    library functions are built then), so ``TRITON_INTERPRET=1`` must be in the environment
    before anything imports Triton, torch._dynamo included: the project's tests/conftest.py
    sets it first thing.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not interpreting() or not isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError(
            "Triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run "
            "on CPU tensors in this process: set TRITON_INTERPRET=1 before the first import of "
            "triton (or of torch._dynamo / transformers, which import it), e.g. at the top of "
            "tests/conftest.py"
        )


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether attention's ``tl.dot`` must multiply in true fp32: always for fp32 inputs (a
    TF32 dot would miss fp32 tolerances), and for bf16 under the interpreter, whose ``tl.dot``
    of Triton 3.9 multiplies the raw bits of bf16 operands. The upcast is exact, so the
    interpreter still checks the numerics of the GPU's bf16 path."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
