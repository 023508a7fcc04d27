"""The CPU backend's C kernels (``csrc/cpu_kernels.c``), compiled on first use and called
through ctypes.

The library is built with the system C compiler for this machine's instruction set
(``-O3 -march=native``) into ``$LLM_CORE_CACHE_DIR/cpu-kernels`` (default
``~/.cache/llm-core/cpu-kernels``), keyed by a hash of the source, the compiler and the CPU, so a
build is paid once per machine. Without a compiler, or with ``LLM_CORE_CPU_KERNELS=0``, the
backend runs its torch operators instead and says why in the log (and in ``status``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from ctypes import c_double, c_float, c_int32, c_int64, c_void_p
from typing import Any

log = logging.getLogger("llm_core_cpu")

#: Set to 0 to run the torch operators instead of the C kernels (for A/B measurements).
ENV_SWITCH = "LLM_CORE_CPU_KERNELS"
_SOURCE = pathlib.Path(__file__).with_name("csrc") / "cpu_kernels.c"
_FLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=gnu11", "-lm"]

#: Kernel name -> C parameter types, in order. ``CpuGraph`` packs recorded calls by these.
SIGNATURES: dict[str, list[Any]] = {
    "llm_linear": [c_void_p, c_int64, c_int64, c_int64, c_void_p, c_int64, c_void_p, c_void_p,
                   c_int64, c_int32],
    "llm_rms_norm": [c_void_p, c_int64, c_void_p, c_int64, c_void_p, c_void_p, c_int64, c_void_p,
                     c_int64, c_int64, c_int64, c_float, c_int32],
    "llm_rotary": [c_void_p, c_void_p, c_int64, c_int64, c_void_p, c_int64, c_int64, c_void_p,
                   c_int64, c_int64, c_int32, c_int64, c_int32],
    "llm_cache_write": [c_void_p, c_int64, c_void_p, c_int64, c_void_p, c_void_p, c_void_p,
                        c_int64, c_int64, c_int32],
    "llm_attention": [c_void_p, c_int64, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_int64,
                      c_int64, c_void_p, c_int64, c_void_p, c_void_p, c_float, c_float, c_int64,
                      c_void_p, c_int64, c_int32],
    "llm_silu_mul": [c_void_p, c_int64, c_void_p, c_int64, c_int64, c_int64, c_int32],
    "llm_embedding": [c_void_p, c_int32, c_void_p, c_int64, c_int64, c_void_p, c_int32],
    "llm_gather_rows": [c_void_p, c_int64, c_void_p, c_int64, c_int64, c_void_p, c_int32],
    "llm_convert": [c_void_p, c_int32, c_void_p, c_int32, c_int64],
    "llm_token_bitmask": [c_void_p, c_int64, c_void_p, c_int64, c_int64, c_int64],
    "llm_gemma_rms_norm": [c_void_p, c_int64, c_void_p, c_int64, c_void_p, c_void_p, c_int64,
                           c_void_p, c_int64, c_int64, c_int64, c_float, c_int32],
    "llm_soft_cap": [c_void_p, c_int64, c_void_p, c_int64, c_int64, c_int64, c_float, c_int32],
    "llm_scale": [c_void_p, c_int64, c_void_p, c_int64, c_int64, c_int64, c_float, c_int32],
    "llm_argmax_rows": [c_void_p, c_int64, c_int64, c_int64, c_void_p],
}  # fmt: skip

#: Record kinds of ``llm_run`` (the enum in the C source), by kernel name.
KINDS: dict[str, int] = {name: i + 1 for i, name in enumerate(SIGNATURES)}


class Record(ctypes.Structure):
    """One recorded kernel call (``llm_record`` in the C source)."""

    _fields_ = [
        ("kind", c_int64),
        ("p", c_void_p * 8),
        ("i", c_int64 * 12),
        ("f", c_double * 2),
    ]


class NativeKernels:
    """The loaded library: one attribute per kernel (``linear``, ``rms_norm`` ...)."""

    def __init__(self, lib: ctypes.CDLL, path: pathlib.Path):
        self.lib = lib
        self.path = path
        for name, argtypes in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = None
            setattr(self, name.removeprefix("llm_"), fn)
        lib.llm_run.argtypes = [c_void_p, c_int64]
        lib.llm_run.restype = c_int64
        lib.llm_record_size.restype = c_int64
        lib.llm_simd_width.restype = c_int32
        lib.llm_set_threads.argtypes = [c_int32]
        if lib.llm_record_size() != ctypes.sizeof(Record):
            raise OSError("the kernel library's record layout differs from native.Record")
        self.simd_width = int(lib.llm_simd_width())

    def set_threads(self, n: int) -> None:
        self.lib.llm_set_threads(n)

    def run(self, records: Any, count: int) -> None:
        done = self.lib.llm_run(ctypes.addressof(records), count)
        if done != count:
            raise RuntimeError(f"captured step: record {-done - 1} has an unknown kernel kind")


_loaded: NativeKernels | None = None
_reason: str | None = None


def native_kernels() -> NativeKernels | None:
    """The kernels of this process (built or found in the cache on the first call), or None
    with the reason in :func:`unavailable_reason` and the log."""
    global _loaded, _reason
    if _loaded is not None or _reason is not None:
        return _loaded
    try:
        _loaded = _load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _reason = str(exc)
        log.warning("CPU backend: C kernels unavailable, using torch operators: %s", _reason)
    return _loaded


def unavailable_reason() -> str | None:
    """Why the C kernels are not in use (None when they are, or before the first attempt)."""
    return _reason


def _load() -> NativeKernels:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        raise RuntimeError(f"turned off by {ENV_SWITCH}=0")
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or $CC) on PATH")
    source = _SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    key = hashlib.sha256(
        b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    cache = pathlib.Path(
        os.environ.get("LLM_CORE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "llm-core"
    )
    path = cache / "cpu-kernels" / f"cpu_kernels-{key}.so"
    if not path.is_file():
        _compile(compiler, path)
    return NativeKernels(ctypes.CDLL(str(path)), path)


def _compile(compiler: str, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [compiler, str(_SOURCE), "-o", tmp, *_FLAGS]
    log.info("CPU backend: compiling C kernels: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {_SOURCE.name} failed: {result.stderr.strip()[-2000:]}")
    os.replace(tmp, path)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
