"""llm_triton: the Triton kernels and the torch GPU backend base shared by the CUDA and ROCm
plugins (distribution ``llm-core-triton``).

Not a backend: it declares no entry point. The CUDA and ROCm plugins depend on it, so neither
imports the other. Importing this package is cheap; :mod:`llm_triton.kernels` and
:mod:`llm_triton.backend` import Triton and torch's GPU runtime when a backend is built.
"""

from llm_hal.spec import distribution_version

__version__ = distribution_version("llm-core-triton")

__all__ = ["__version__"]
