"""The one door to torch-npu: importing it, and the operator namespace the backend calls.

The backend never names ``torch_npu``. It is handed the namespace that holds the NPU operators:
``torch.ops.npu`` after :func:`load` has imported torch-npu, which registers them there. The
tests hand it the very same namespace with the operators registered from torch-npu's own
schemas instead (tests/support/ascend_schemas.py), so every call the backend makes is checked
against the real signature on a machine without an NPU, and nothing is patched.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

#: torch-npu's device extension is imported by ``import torch`` itself (torch's "device
#: backend autoload") unless this is "0"; without CANN that import fails and takes
#: ``import torch`` down with it. llm-core imports torch-npu itself, when the backend is used.
AUTOLOAD_ENV = "TORCH_DEVICE_BACKEND_AUTOLOAD"

#: The torch-npu release this plugin is written and schema-checked against (the ``ascend`` extra
#: pins it); it requires torch of the same version.
TORCH_NPU_VERSION = "2.13.0"

#: ACL storage formats accepted by ``npu_format_cast`` (CANN's aclFormat enum).
ACL_FORMAT_ND = 2
ACL_FORMAT_FRACTAL_NZ = 29


def keep_torch_importable() -> None:
    """Turn torch's autoload of torch-npu off for this process and its children, unless the
    user chose a value. Only affects a later ``import torch``; harmless when torch is loaded."""
    os.environ.setdefault(AUTOLOAD_ENV, "0")


def import_torch_npu() -> ModuleType:
    """Import torch-npu (registering the ``npu`` device and its operators).

    Raises ImportError or OSError as torch-npu does; callers turn them into a reason.
    """
    return importlib.import_module("torch_npu")


def load() -> Any:
    """The namespace of torch-npu's operators, ``torch.ops.npu``, after importing torch-npu."""
    import torch

    import_torch_npu()
    return torch.ops.npu
