"""llm_core_example: an example third-party backend for llm-core.

The package is kept import-light on purpose: the registry imports only ``plugin`` at
discovery, and ``backend`` is imported by the factory when the backend is actually created.
"""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("llm-core-example-backend")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
