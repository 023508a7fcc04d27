"""Per-operator fallback from one backend to another: off by default, loud when on.

``FallbackBackend`` wraps a primary backend. Operators the primary does not support are run on
the fallback backend instead, with their tensors copied across through the host. Each fallen
back call is counted (``counts``), and the first one of each operator is logged as a warning,
so a user always sees what ran where. The conformance suite never enables it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from typing import Any

import numpy as np

from llm_hal.backend import OPS, Backend
from llm_hal.dtypes import DType

log = logging.getLogger("llm_hal.fallback")

#: Operators that write into their tensor arguments; those are copied back afterwards.
_IN_PLACE = {"rotary_embedding", "reshape_and_cache", "apply_penalties", "apply_token_bans",
             "all_reduce"}  # fmt: skip


class FallbackBackend(Backend):
    """The primary backend, with unsupported operators routed to ``fallback``."""

    def __init__(self, primary: Backend, fallback: Backend):
        self.primary = primary
        self.fallback = fallback
        self.counts: Counter[str] = Counter()
        self.name = primary.name  # type: ignore[misc]
        self.float_dtypes = primary.float_dtypes  # type: ignore[misc]
        self.routed = {op for op in OPS if not primary.supports(op) and fallback.supports(op)}

    def __getattribute__(self, attr: str) -> Any:
        if attr in OPS:
            if attr in object.__getattribute__(self, "routed"):
                return object.__getattribute__(self, "_make_fallen_back")(attr)
            return getattr(object.__getattribute__(self, "primary"), attr)
        return object.__getattribute__(self, attr)

    def __getattr__(self, attr: str) -> Any:
        # Device, memory and every other non-operator attribute belong to the primary.
        return getattr(self.primary, attr)

    def supports(self, op: str, dtype: DType | None = None, **shape: int) -> bool:
        if op in self.routed:
            return self.fallback.supports(op, dtype, **shape)
        return self.primary.supports(op, dtype, **shape)

    def native_ops(self) -> frozenset[str]:
        return self.primary.native_ops()

    def _make_fallen_back(self, op: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.counts[op]:
                log.warning(
                    "operator %s is not supported by backend %s; running it on %s (fallback)",
                    op, self.primary.name, self.fallback.name,
                )  # fmt: skip
            self.counts[op] += 1
            moved_args = [self._move(a, self.primary, self.fallback) for a in args]
            moved_kwargs = {k: self._move(v, self.primary, self.fallback) for k, v in kwargs.items()}
            result = getattr(self.fallback, op)(*moved_args, **moved_kwargs)
            if op in _IN_PLACE:
                pairs = [*zip(args, moved_args), *((kwargs[k], moved_kwargs[k]) for k in kwargs)]
                for original, moved in pairs:
                    if _is_tensor(original):
                        self.primary.copy_(original, self._move(moved, self.fallback, self.primary))
                if op != "reshape_and_cache":
                    return args[1:3] if op == "rotary_embedding" else args[0]
            return self._move(result, self.fallback, self.primary)

        return call

    def _move(self, value: Any, src: Backend, dst: Backend) -> Any:
        if _is_tensor(value):
            return dst.from_host(src.to_host(value))
        if isinstance(value, list | tuple):
            return type(value)(self._move(v, src, dst) for v in value)
        if is_dataclass(value) and not isinstance(value, type) and hasattr(value, "weight"):
            updates = {f.name: self._move(getattr(value, f.name), src, dst) for f in fields(value)}
            return replace(value, **updates)
        if is_dataclass(value) and not isinstance(value, type) and hasattr(value, "top_ids"):
            return type(value)(*(self._move(getattr(value, f.name), src, dst) for f in fields(value)))
        return value


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.ndarray)
