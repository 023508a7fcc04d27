"""The example backend: every reference operator, with ``silu_and_mul`` replaced by its own.

This is how a vendor starts: subclass the reference (``llm_hal.TorchBackend``), which already
implements every HAL operator in plain PyTorch on any torch device, and replace operators one
at a time with faster ones, each keeping the contract in its ``llm_hal.Backend`` docstring.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from llm_hal import DType, TorchBackend
from llm_hal.backend import Tensor


class ExampleBackend(TorchBackend):
    name: ClassVar[str] = "example"
    # No fp64: ``supports(op, DType.FP64)`` answers False, so nothing routes fp64 work here.
    float_dtypes: ClassVar[frozenset[DType]] = frozenset({DType.FP32, DType.BF16, DType.FP16})

    def silu_and_mul(self, x: torch.Tensor, out: Tensor | None = None) -> Tensor:
        """``silu(gate) * up`` for x = [gate | up] (T, 2I), computed in fp32: the contract of
        ``Backend.silu_and_mul``. Slices instead of the reference's chunk-and-upcast of the
        whole input; fp32 writes straight into ``out``."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            return super().silu_and_mul(x, out)  # the reference covers what this does not
        half = x.shape[-1] // 2
        gate, up = x[..., :half], x[..., half:]
        if x.dtype == torch.float32:
            return torch.mul(F.silu(gate), up, out=out)  # out=None allocates
        y = (F.silu(gate.float()) * up.float()).to(x.dtype)  # fp32 math, one rounding
        return y if out is None else out.copy_(y)
