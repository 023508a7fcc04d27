"""llm_core_ascend: the Ascend NPU backend of llm-core, on torch-npu's fused operators.

Importing this package never imports torch_npu: the SDK is loaded by the backend's probe and
factory (see :mod:`llm_core_ascend.plugin`), so a machine without CANN still imports it.
"""

from llm_core_ascend.version import __version__

__all__ = ["__version__"]
