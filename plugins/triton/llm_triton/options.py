"""On/off backend options shared by the CUDA and ROCm plugins."""

from __future__ import annotations

import os

from llm_hal import BackendConfig

#: Backend options (``BackendConfig.options``) and the environment variables that set them.
OPTION_ENV = {"cupy": "LLM_CORE_CUDA_CUPY", "cuda_graphs": "LLM_CORE_CUDA_GRAPHS"}


def option_enabled(config: BackendConfig, name: str) -> bool:
    """An on/off option: ``config.options[name]``, else its environment variable, else on."""
    value = config.options.get(name, os.environ.get(OPTION_ENV[name], "1"))
    return value.strip().lower() not in ("0", "false", "off", "no")
