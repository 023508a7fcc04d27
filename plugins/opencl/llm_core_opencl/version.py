"""The plugin's version: that of its distribution (the repository's one version)."""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("llm-core-opencl")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
