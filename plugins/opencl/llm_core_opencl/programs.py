"""OpenCL programs built once per context and set of defines; kernels fetched once.

The sources live in ``kernels/`` next to this file; every program is ``common.h`` followed by
one ``.cl`` file, specialized with ``-D`` defines (storage type, work-group size, tile sizes).
A failed build raises :class:`KernelBuildError` carrying the compiler's log.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from llm_hal import HALError


class KernelBuildError(HALError):
    """The OpenCL compiler rejected a program; the message holds its build log."""


def kernel_source(name: str) -> str:
    """The text of ``kernels/<name>``."""
    return resources.files("llm_core_opencl").joinpath("kernels", name).read_text()


class ProgramCache:
    """Builds each (source file, defines) program once for one device and context."""

    def __init__(self, context: Any, device: Any):
        self.context = context
        self.device = device
        self._programs: dict[tuple[str, bool, tuple[tuple[str, int], ...]], Any] = {}
        self._kernels: dict[tuple[Any, str], Any] = {}
        self._header = kernel_source("common.h")

    def kernel(self, source: str, name: str, *, mad: bool = False, **defines: int) -> Any:
        """Kernel ``name`` of ``kernels/<source>`` built with ``-Dkey=value`` for defines;
        ``mad`` adds ``-cl-mad-enable`` (a * b + c may be fused)."""
        program = self.program(source, mad=mad, **defines)
        key = (id(program), name)
        kernel = self._kernels.get(key)
        if kernel is None:
            import pyopencl as cl

            kernel = self._kernels[key] = cl.Kernel(program, name)
        return kernel

    def program(self, source: str, *, mad: bool = False, **defines: int) -> Any:
        key = (source, mad, tuple(sorted(defines.items())))
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self._build(source, mad, key[2])
        return program

    def _build(self, source: str, mad: bool, defines: tuple[tuple[str, int], ...]) -> Any:
        import pyopencl as cl

        text = self._header + "\n" + kernel_source(source)
        options = [f"-D{k}={v}" for k, v in defines] + (["-cl-mad-enable"] if mad else [])
        program = cl.Program(self.context, text)
        try:
            return program.build(options=options, devices=[self.device])
        except cl.Error as exc:
            try:
                log = program.get_build_info(self.device, cl.program_build_info.LOG)
            except cl.Error:
                log = ""
            raise KernelBuildError(
                f"OpenCL build of {source} ({' '.join(options)}) failed on "
                f"{self.device.name}:\n{(log or str(exc)).strip()}"
            ) from exc
