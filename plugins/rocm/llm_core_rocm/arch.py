"""Facts about AMD GPU architectures (``gcnArchName``, e.g. ``"gfx942:sramecc+:xnack-"``)."""

from __future__ import annotations

from llm_hal import DType

#: CDNA3 (MI300 series): fp8 in the FNUZ variant (no negative zero, NaN = 0x80, bias 8).
_FNUZ_ARCHS = frozenset({"gfx940", "gfx941", "gfx942"})
#: Architectures with fp8 arithmetic: CDNA3 (FNUZ), CDNA4 MI350 (OCP), RDNA4 (OCP).
_NATIVE_FP8_PREFIXES = ("gfx940", "gfx941", "gfx942", "gfx950", "gfx12")


def base_arch(gcn_arch_name: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"``: the target without its feature flags."""
    return gcn_arch_name.split(":", 1)[0].strip().lower()


def fp8_dtype(gcn_arch_name: str) -> DType:
    """The fp8 (e4m3) format of an AMD GPU: FNUZ on gfx940/941/942 (MI300), the OCP e4m3fn
    everywhere else (gfx950 and RDNA4 compute in it; older chips only store it)."""
    return DType.FP8_E4M3FNUZ if base_arch(gcn_arch_name) in _FNUZ_ARCHS else DType.FP8_E4M3FN


def has_native_fp8(gcn_arch_name: str) -> bool:
    """Whether the GPU computes in fp8 (and Triton converts to and from it there)."""
    return base_arch(gcn_arch_name).startswith(_NATIVE_FP8_PREFIXES)
