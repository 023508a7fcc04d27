"""llm_hal: the hardware-abstraction layer of llm-core.

The contract (:class:`Backend` and its operators), the plugin hooks, the reference
implementation of every operator, and discovery and selection of backends.
"""

import os

# Installed device extensions (torch-npu, ...) would otherwise load at `import torch` and can
# break it when their vendor runtime is missing. Backends import their SDK themselves, lazily,
# and report a clear reason when it fails. A user's explicit setting wins.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from llm_hal.backend import (
    OPS,
    Backend,
    LogprobsResult,
    MemoryInfo,
    Tensor,
)
from llm_hal.dtypes import DType
from llm_hal.errors import (
    APIVersionMismatchError,
    BackendLoadError,
    BackendUnavailableError,
    HALError,
    UnsupportedOpError,
)
from llm_hal.fallback import FallbackBackend
from llm_hal.hookspecs import ENTRY_POINT_GROUP, hookimpl
from llm_hal.metadata import AttentionMetadata, PenaltyMetadata, SamplingMetadata
from llm_hal.reference import TorchBackend
from llm_hal.registry import BackendRecord, Registry, get_registry
from llm_hal.spec import Availability, BackendConfig, BackendSpec, DeviceInfo
from llm_hal.version import HAL_API_VERSION
from llm_hal.weights import LinearWeight, QuantScheme

__all__ = [
    "ENTRY_POINT_GROUP",
    "HAL_API_VERSION",
    "OPS",
    "APIVersionMismatchError",
    "AttentionMetadata",
    "Availability",
    "Backend",
    "BackendConfig",
    "BackendLoadError",
    "BackendRecord",
    "BackendSpec",
    "BackendUnavailableError",
    "DType",
    "DeviceInfo",
    "FallbackBackend",
    "HALError",
    "LinearWeight",
    "LogprobsResult",
    "MemoryInfo",
    "PenaltyMetadata",
    "QuantScheme",
    "Registry",
    "SamplingMetadata",
    "Tensor",
    "TorchBackend",
    "UnsupportedOpError",
    "get_registry",
    "hookimpl",
]
