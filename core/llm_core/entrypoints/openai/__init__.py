"""The OpenAI-compatible server: ``create_app`` (FastAPI) and ``run_server`` (uvicorn).

Imported lazily, so that ``llm-core`` commands that do not serve never import the web stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_core.entrypoints.openai.api_server import create_app, run_server
    from llm_core.entrypoints.openai.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "run_server"]

_WHERE = {
    "ServerConfig": "llm_core.entrypoints.openai.config",
    "create_app": "llm_core.entrypoints.openai.api_server",
    "run_server": "llm_core.entrypoints.openai.api_server",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
