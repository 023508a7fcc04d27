"""Data types that cross the HAL, and their torch equivalents for torch-based backends."""

from __future__ import annotations

import enum

import torch


class DType(str, enum.Enum):
    """Element types a HAL tensor may hold.

    ``INT4_PACKED`` stores two unsigned 4-bit values per byte (low nibble first). ``FP8_E4M3FNUZ``
    is the fp8 variant of AMD gfx942 (MI300); ``FP8_E4M3FN`` the OCP variant of NVIDIA and others.
    """

    FP64 = "float64"
    FP32 = "float32"
    FP16 = "float16"
    BF16 = "bfloat16"
    FP8_E4M3FN = "float8_e4m3fn"
    FP8_E4M3FNUZ = "float8_e4m3fnuz"
    INT64 = "int64"
    INT32 = "int32"
    INT8 = "int8"
    UINT8 = "uint8"
    INT4_PACKED = "int4_packed"
    BOOL = "bool"

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def itemsize(self) -> float:
        """Bytes per element (0.5 for packed int4)."""
        if self is DType.INT4_PACKED:
            return 0.5
        return float(to_torch(self).itemsize)

    @classmethod
    def parse(cls, name: str | DType | torch.dtype) -> DType:
        """Accepts ``"bf16"``, ``"bfloat16"``, ``torch.bfloat16`` or a DType."""
        if isinstance(name, DType):
            return name
        if isinstance(name, torch.dtype):
            return from_torch(name)
        key = name.lower().replace("torch.", "")
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            choices = ", ".join(sorted({*_ALIASES, *(d.value for d in cls)}))
            raise ValueError(f"unknown dtype {name!r}; choose one of: {choices}") from None


_FLOATS = {DType.FP64, DType.FP32, DType.FP16, DType.BF16, DType.FP8_E4M3FN, DType.FP8_E4M3FNUZ}
_ALIASES = {
    "fp64": "float64", "double": "float64",
    "fp32": "float32", "float": "float32",
    "fp16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn", "fp8_e4m3fn": "float8_e4m3fn", "fp8_e4m3fnuz": "float8_e4m3fnuz",
}  # fmt: skip

_TORCH = {
    DType.FP64: torch.float64,
    DType.FP32: torch.float32,
    DType.FP16: torch.float16,
    DType.BF16: torch.bfloat16,
    DType.FP8_E4M3FN: torch.float8_e4m3fn,
    DType.FP8_E4M3FNUZ: torch.float8_e4m3fnuz,
    DType.INT64: torch.int64,
    DType.INT32: torch.int32,
    DType.INT8: torch.int8,
    DType.UINT8: torch.uint8,
    DType.INT4_PACKED: torch.uint8,
    DType.BOOL: torch.bool,
}
_FROM_TORCH = {v: k for k, v in _TORCH.items() if k is not DType.INT4_PACKED}


def to_torch(dtype: DType) -> torch.dtype:
    """The torch dtype that stores ``dtype`` (packed int4 is stored as uint8)."""
    return _TORCH[dtype]


def from_torch(dtype: torch.dtype) -> DType:
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no HAL equivalent") from None
