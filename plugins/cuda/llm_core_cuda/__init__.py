"""llm_core_cuda: the CUDA backend of llm-core (PyTorch CUDA, Triton and CuPy kernels).

Importing this package is cheap and never imports Triton or CuPy: the backend class lives in
``llm_core_cuda.backend`` and the kernels in ``llm_core_cuda.triton_kernels``, imported when a
backend is built. The ROCm plugin reuses both.
"""

from llm_core_cuda.version import __version__

__all__ = ["__version__"]
