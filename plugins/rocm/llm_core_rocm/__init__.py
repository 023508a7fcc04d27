"""llm_core_rocm: the ROCm backend of llm-core (PyTorch ROCm + the Triton kernels of llm_triton).

Importing this package is cheap: the backend lives in ``llm_core_rocm.backend``.
"""

from llm_core_rocm.version import __version__

__all__ = ["__version__"]
