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
from typing import Any

import numpy as np

from llm_hal.backend import OPS, Backend, CapturedGraph, LogprobsResult
from llm_hal.dtypes import DType
from llm_hal.weights import LinearWeight, QuantScheme

log = logging.getLogger("llm_hal.fallback")

#: Operators that write into their tensor arguments; those are copied back afterwards.
_IN_PLACE = {"rotary_embedding", "reshape_and_cache", "apply_penalties", "apply_token_bans",
             "apply_token_bitmask", "all_reduce"}  # fmt: skip

#: Device, memory and layout methods of the contract: always the primary's, whose tensors
#: the caller holds.
_OWN = {"supports", "native_ops", "prepare_linear", "capture_graph"}
_DELEGATED = frozenset(n for n in vars(Backend) if not n.startswith("_") and n not in {*OPS, *_OWN})


class FallbackBackend(Backend):
    """The primary backend, with unsupported operators routed to ``fallback``."""

    def __init__(self, primary: Backend, fallback: Backend):
        self.primary = primary
        self.fallback = fallback
        self.counts: Counter[str] = Counter()
        self.routed = frozenset(
            op for op in OPS if not primary.supports(op) and fallback.supports(op)
        )

    def __getattribute__(self, attr: str) -> Any:
        if attr in OPS:
            if attr in object.__getattribute__(self, "routed"):
                return object.__getattribute__(self, "_make_fallen_back")(attr)
            return getattr(object.__getattribute__(self, "primary"), attr)
        if attr in _DELEGATED:
            return getattr(object.__getattribute__(self, "primary"), attr)
        return object.__getattribute__(self, attr)

    def __getattr__(self, attr: str) -> Any:
        # Anything else the primary offers beyond the contract (a torch device, a TP group).
        return getattr(self.primary, attr)

    def supports(self, op: str, dtype: DType | None = None, **shape: int) -> bool:
        if op in self.routed:
            return self.fallback.supports(op, dtype, **shape)
        return self.primary.supports(op, dtype, **shape)

    def native_ops(self) -> frozenset[str]:
        return self.primary.native_ops()

    def capture_graph(self, fn: Callable[[], object]) -> CapturedGraph | None:
        if self.routed:  # operators run on the fallback would be missing from the graph
            fn()
            return None
        return self.primary.capture_graph(fn)

    def prepare_linear(
        self,
        weight: Any,
        bias: Any | None = None,
        scheme: QuantScheme = QuantScheme.NONE,
        scales: Any | None = None,
        zeros: Any | None = None,
        group_size: int = 0,
    ) -> LinearWeight:
        if "linear" not in self.routed:
            return self.primary.prepare_linear(weight, bias, scheme, scales, zeros, group_size)
        # Keep the documented form on the primary; each call prepares it on the fallback.
        n, k = self.primary.shape(weight)
        k *= 2 if scheme is QuantScheme.W4A16 else 1
        return LinearWeight(weight, bias, scheme, n, k, scales, zeros, group_size)

    def _make_fallen_back(self, op: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.counts[op]:
                log.warning(
                    "operator %s is not supported by backend %s; running it on %s (fallback)",
                    op, self.primary.name, self.fallback.name,
                )  # fmt: skip
            self.counts[op] += 1
            there, back = (self.primary, self.fallback), (self.fallback, self.primary)
            moved_args = [self._move(a, *there) for a in args]
            moved_kwargs = {k: self._move(v, *there) for k, v in kwargs.items()}
            result = getattr(self.fallback, op)(*moved_args, **moved_kwargs)
            if op not in _IN_PLACE:
                return self._move(result, *back)
            pairs = [
                *zip(args, moved_args, strict=True),
                *((kwargs[k], moved_kwargs[k]) for k in kwargs),
            ]
            originals = {id(m): o for o, m in pairs if _is_tensor(o)}
            for original, moved in pairs:
                if _is_tensor(original):
                    self.primary.copy_(original, self._move(moved, *back))
            return self._originals(result, originals)

        return call

    def _originals(self, result: Any, originals: dict[int, Any]) -> Any:
        """Map an in-place op's result (its moved arguments) back to the caller's tensors."""
        if isinstance(result, tuple | list):
            return type(result)(self._originals(r, originals) for r in result)
        if id(result) in originals:
            return originals[id(result)]
        return self._move(result, self.fallback, self.primary)

    def _move(self, value: Any, src: Backend, dst: Backend) -> Any:
        if _is_tensor(value):
            return dst.from_host(src.to_host(value))
        if isinstance(value, LinearWeight):
            # The documented fields, prepared afresh: ``packed`` is private to ``src``.
            w = value
            weight, bias, scales, zeros = self._move(
                (w.weight, w.bias, w.scales, w.zeros), src, dst
            )
            return dst.prepare_linear(weight, bias, w.scheme, scales, zeros, w.group_size)
        if isinstance(value, LogprobsResult):
            r = value
            return LogprobsResult(
                *self._move((r.token_logprobs, r.token_ranks, r.top_logprobs, r.top_ids), src, dst)
            )
        if isinstance(value, tuple | list):
            return type(value)(self._move(v, src, dst) for v in value)
        return value


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.ndarray)
