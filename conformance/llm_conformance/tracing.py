"""A backend proxy that records which operators a model actually calls.

The set of operators a model needs is not declared anywhere: it is traced by running the model
through :class:`RecordingBackend`, which delegates every call to the backend under test and
counts the checked operators (the HAL ops and the device-contract methods the suite checks).
A cell is certified only if every traced operator passed the operator level on that backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from llm_hal import Backend

from llm_conformance.opsuite import checked_ops

_RECORDED = frozenset(checked_ops())
#: Everything else of the contract is the inner backend's, unchanged.
_DELEGATED = frozenset(n for n in dir(Backend) if not n.startswith("__")) - _RECORDED


class RecordingBackend(Backend):
    """``inner`` with every call of a checked operator counted in ``calls``."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattribute__(self, attr: str) -> Any:
        if attr in _RECORDED:
            inner = object.__getattribute__(self, "inner")
            calls = object.__getattribute__(self, "calls")
            return _counted(getattr(inner, attr), attr, calls)
        if attr in _DELEGATED:
            return getattr(object.__getattribute__(self, "inner"), attr)
        return object.__getattribute__(self, attr)

    def __getattr__(self, attr: str) -> Any:
        # Anything the inner backend offers beyond the contract (a torch device, a TP group).
        return getattr(self.inner, attr)

    @property
    def traced_ops(self) -> list[str]:
        """The operators called so far: memory methods first, then HAL ops, in contract order."""
        return [op for op in checked_ops() if self.calls[op]]


def _counted(method: Callable[..., Any], name: str, calls: Counter[str]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return method(*args, **kwargs)

    return call
