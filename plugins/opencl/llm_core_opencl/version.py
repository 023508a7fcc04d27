"""The plugin's version: that of its distribution (the repository's one version)."""

from llm_hal.spec import distribution_version

__version__ = distribution_version("llm-core-opencl")
