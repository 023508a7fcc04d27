"""llm_triton: the Triton kernels and the torch GPU backend base shared by the CUDA and ROCm
plugins (distribution ``llm-core-triton``).

Not a backend: it declares no entry point. The CUDA and ROCm plugins depend on it, so neither
imports the other. Importing this package is cheap; :mod:`llm_triton.kernels` and
:mod:`llm_triton.backend` import Triton and torch's GPU runtime when a backend is built.
"""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("llm-core-triton")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
