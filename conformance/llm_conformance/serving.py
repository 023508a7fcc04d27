"""Running the real engine on the backend instance under test.

The engine creates its backend through the registry by name. The suite tests an *instance*
(wrapped in a recording proxy, or a vendor's object handed to the Python API), so while an
engine is built, :func:`engine_on` registers that instance under its own name in the
process-wide registry, and restores the registry afterwards. Per-operator fallback is switched
off while it builds (conformance forbids it), and decode graphs are captured unless asked not to
(``LLM_CORE_ENFORCE_EAGER``, read when the engine is built).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llm_core import LLM
from llm_core.engine.llm_engine import ENV_FALLBACK
from llm_core.engine.model_runner import ENV_ENFORCE_EAGER
from llm_hal import HAL_API_VERSION, Availability, Backend, BackendRecord, BackendSpec, get_registry

from llm_conformance.tolerances import SUITE_VERSION


@contextmanager
def _registered(backend: Backend) -> Iterator[str]:
    registry = get_registry()
    name = backend.name
    saved = registry.records.get(name)
    spec = BackendSpec(
        name=name,
        version=SUITE_VERSION,
        api_version=HAL_API_VERSION,
        priority=0,
        probe=Availability.yes,
        factory=lambda _config: backend,
        description="the backend instance under conformance test",
    )
    registry.records[name] = BackendRecord(name, "llm_conformance", "llm-core", SUITE_VERSION, spec)
    fallback = os.environ.pop(ENV_FALLBACK, None)
    try:
        yield name
    finally:
        if fallback is not None:
            os.environ[ENV_FALLBACK] = fallback
        if saved is None:
            registry.records.pop(name, None)
        else:
            registry.records[name] = saved


@contextmanager
def _eager(on: bool) -> Iterator[None]:
    saved = os.environ.get(ENV_ENFORCE_EAGER)
    os.environ[ENV_ENFORCE_EAGER] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_ENFORCE_EAGER, None)
        else:
            os.environ[ENV_ENFORCE_EAGER] = saved


def engine_on(
    backend: Backend, model: str, dtype: str, *, eager: bool = False, **engine_args: Any
) -> LLM:
    """An :class:`~llm_core.LLM` whose engine runs on ``backend`` (the very instance).
    ``eager``: never replay captured decode graphs (the engine's enforce-eager switch)."""
    engine_args.setdefault("load_progress", False)
    with _registered(backend) as name, _eager(eager):
        llm = LLM(model, backend=name, dtype=dtype, fallback_backend=None, **engine_args)
    if llm.llm_engine.backend is not backend:
        raise RuntimeError("the engine did not take the backend under test")
    return llm
