"""llm_core_opencl: the OpenCL backend of llm-core (PyOpenCL and OpenCL C kernels).

Importing this package never imports pyopencl: the plugin module must load on machines without
an OpenCL runtime, where the probe then says why the backend is unavailable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_core_opencl.backend import OpenCLBackend

__all__ = ["OpenCLBackend"]


def __getattr__(name: str) -> Any:
    if name == "OpenCLBackend":
        from llm_core_opencl.backend import OpenCLBackend

        return OpenCLBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
