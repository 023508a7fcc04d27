"""The CPU plugin's version: that of the llm-core distribution that ships it."""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("llm-core")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
