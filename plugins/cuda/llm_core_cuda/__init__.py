"""llm_core_cuda: the CUDA backend of llm-core (PyTorch CUDA, Triton and CuPy kernels).

Importing this package is cheap and never imports Triton or CuPy: the backend class lives in
``llm_core_cuda.backend``; the Triton kernels and the GPU backend base it extends live in the
shared ``llm_triton`` package (distribution llm-core-triton), which the ROCm plugin uses too.
"""

from llm_core_cuda.version import __version__

__all__ = ["__version__"]
