"""A minimal binding of NVRTC, the CUDA runtime compiler: CUDA C source to PTX, no GPU needed.

CuPy compiles the same sources at run time, but it asks the driver for the device's
architecture first; this binding takes the architecture as an argument, so the kernels can be
compiled on a machine without a GPU (CI) and for any target. ``libnvrtc`` comes from the
NVIDIA wheels (``pip install "cuda-toolkit[nvrtc]==13.*"`` or ``nvidia-cuda-nvrtc-cu12``) or a
CUDA toolkit on the library path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import site
import sys
from collections.abc import Sequence


class NvrtcError(RuntimeError):
    """NVRTC is missing, or it rejected a program (the message holds the compiler log)."""


def _candidates() -> list[str]:
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    found: list[str] = []
    for root in dict.fromkeys(roots):
        for pattern in ("nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            found.extend(sorted(glob.glob(os.path.join(root, pattern)), reverse=True))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found.extend(
                sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
            )
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    # Prefer the real library over the builtins helper that matches the same glob.
    return [f for f in dict.fromkeys(found) if "builtins" not in os.path.basename(f)]


_lib: ctypes.CDLL | None = None


def load_nvrtc() -> ctypes.CDLL:
    """The NVRTC library (cached); raises :class:`NvrtcError` saying how to install it."""
    global _lib
    if _lib is not None:
        return _lib
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        _lib = lib
        return lib
    tried = "; ".join(errors) or "no libnvrtc.so found"
    raise NvrtcError(
        f'NVRTC not found ({tried}): pip install "cuda-toolkit[nvrtc]==13.*" '
        "or install a CUDA toolkit"
    )


def nvrtc_version() -> tuple[int, int]:
    lib = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(lib: ctypes.CDLL, status: int, what: str, log: str = "") -> None:
    if status != 0:
        name = lib.nvrtcGetErrorString(status).decode()
        raise NvrtcError(f"{what} failed: {name}" + (f"\n{log}" if log else ""))


def compile_to_ptx(
    source: str, arch: str = "compute_90", options: Sequence[str] = (), name: str = "kernel.cu"
) -> str:
    """Compile CUDA C ``source`` for virtual architecture ``arch`` (``compute_90``) and
    return the PTX text."""
    lib = load_nvrtc()
    prog = ctypes.c_void_p()
    _check(
        lib,
        lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        log_size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        lib.nvrtcGetProgramLog(prog, log)
        _check(lib, status, f"compiling {name} for {arch}", log.value.decode(errors="replace"))
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
