"""The CPU plugin's version: that of the llm-core distribution that ships it."""

from llm_hal.spec import distribution_version

__version__ = distribution_version("llm-core")
