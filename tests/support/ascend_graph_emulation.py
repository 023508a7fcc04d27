"""EMULATION, not torch-npu: torch-npu's graph API (``NPUGraph``, ``graph``,
``graph_pool_handle``) on CPU tensors, for checking the backend's graph mode without an NPU.

It keeps the semantics that decide whether a recorded decode step is right, as torch-npu
2.13.0's ``torch_npu/npu/graphs.py`` and its graph handlers define them:

- a capture records every operator with its arguments as they were: tensors by address,
  everything else (host lists, Python numbers) frozen. Replay re-runs the recorded operators
  on the same tensors, so a value the step read from the host at capture stays what it was;
  results are written back into the tensors the capture returned;
- a capture does not compute: tensors the recorded operators create hold garbage (NaN
  here) until the first replay;
- a capture cannot read device values on the host (``.item()``): refused, as on the device;
- with ``auto_dispatch_capture=True`` the operators torch-npu has graph handlers for (the
  fused attention) become update records, in order, and ``NPUGraph.update(cpu_update_input)``
  replaces their arguments by name: one dict per record, or one dict for all, else
  RuntimeError; without ``auto_dispatch_capture``, ``update`` raises.

The handled operators and their updatable arguments come from the wheel
(:class:`support.ascend_schemas.GraphAPI`), and the signatures here are the wheel's
(tests/test_ascend_graphs.py compares them). What the NPU runtime does (task groups, the
update stream, events, memory pools) is not emulated.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map


@dataclass(slots=True)
class _Call:
    func: Any
    args: list[Any]
    kwargs: dict[str, Any]
    out: Any
    updatable: tuple[str, ...] | None  # None: not an update record


def _frozen(value: Any) -> Any:
    """Tensors by reference (an address in the graph), everything else copied."""
    return tree_map(lambda x: x if isinstance(x, torch.Tensor) else copy.deepcopy(x), value)


class _Recording(TorchDispatchMode):
    def __init__(self, graph: NPUGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError(
                "EMULATED NPU graph capture: a device value was read on the host (.item()), "
                "which a capture cannot record"
            )
        out = func(*args, **kwargs)
        g = self.graph
        updatable = g.update_keys.get(func.__name__) if g.auto_dispatch_capture else None
        g.calls.append(_Call(func, list(_frozen(args)), dict(_frozen(kwargs)), out, updatable))
        return out


def _storages(value: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_leaves(value) if _is_tensor(t)}


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


class NPUGraph:
    """Emulates ``torch.npu.NPUGraph`` (the methods the backend uses)."""

    #: Operator overload -> arguments ``update`` re-issues (the wheel's graph handlers).
    update_keys: Mapping[str, tuple[str, ...]] = {}

    def __init__(self) -> None:
        self.auto_dispatch_capture = False
        self.calls: list[_Call] = []
        self._mode: _Recording | None = None
        self._pool: object | None = None
        self._captured = False

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global") -> None:
        if self._mode is not None:
            raise RuntimeError("EMULATED NPU graph: a capture is already underway")
        self._pool = pool if pool is not None else object()
        self.calls = []
        self._mode = _Recording(self)
        self._mode.__enter__()

    def capture_end(self) -> None:
        if self._mode is None:
            raise RuntimeError("EMULATED NPU graph: no capture is underway")
        self._mode.__exit__(None, None, None)
        self._mode = None
        self._captured = True
        # A capture records without computing: what it created holds garbage until replay.
        for call in self.calls:
            inputs = _storages((call.args, call.kwargs))
            for t in tree_leaves(call.out):
                fresh = _is_tensor(t) and t.untyped_storage().data_ptr() not in inputs
                if fresh and t.is_floating_point():
                    t.fill_(float("nan"))

    def replay(self) -> None:
        if not self._captured:
            raise RuntimeError("EMULATED NPU graph: replay before a finished capture")
        for call in self.calls:
            new = call.func(*call.args, **call.kwargs)
            for old, fresh in zip(tree_leaves(call.out), tree_leaves(new), strict=True):
                if not _is_tensor(old) or old.data_ptr() == fresh.data_ptr():
                    continue  # in place or a view: already where the graph reads it
                if old.shape != fresh.shape:
                    raise RuntimeError(
                        f"EMULATED NPU graph: {call.func.__name__} returned shape "
                        f"{tuple(fresh.shape)} on replay, {tuple(old.shape)} when captured "
                        "(a data-dependent shape cannot be recorded)"
                    )
                old.copy_(fresh)

    def update(self, cpu_update_input: list[dict[str, Any]]) -> None:
        if not self.auto_dispatch_capture:
            raise RuntimeError(
                "The current graph configuration does not support update,"
                "Try to capture by setting auto_dispatch_capture=True during capture"
            )
        records = [c for c in self.calls if c.updatable is not None]
        if len(cpu_update_input) == 1:
            cpu_update_input = [dict(cpu_update_input[0]) for _ in records]
        if len(cpu_update_input) != len(records):
            raise RuntimeError(
                f"Currently, there are {len(records)} operators that need to be updated by "
                f"capture, and there are only {len(cpu_update_input)} elements in the incoming "
                "cpu_update_input list"
            )
        for record, values in zip(records, cpu_update_input, strict=True):
            for key, value in values.items():
                if key in record.kwargs:
                    record.kwargs[key] = value

    def pool(self) -> object | None:
        return self._pool


class graph:  # torch-npu's name
    """Emulates ``torch.npu.graph``: captures into ``npu_graph`` inside the ``with`` block."""

    def __init__(
        self,
        npu_graph: NPUGraph,
        pool: Any = None,
        stream: Any = None,
        auto_dispatch_capture: bool = False,
        capture_error_mode: str = "global",
    ):
        self.npu_graph = npu_graph
        self.pool = pool
        self.capture_error_mode = capture_error_mode
        npu_graph.auto_dispatch_capture = auto_dispatch_capture

    def __enter__(self) -> None:
        self.npu_graph.capture_begin(self.pool, capture_error_mode=self.capture_error_mode)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.npu_graph.capture_end()


def graph_pool_handle() -> object:
    """Emulates ``torch.npu.graph_pool_handle``: an opaque token."""
    return object()


def runtime(update_keys: Mapping[str, tuple[str, ...]]) -> SimpleNamespace:
    """A namespace standing in for ``torch.npu``'s graph API, with torch-npu's handled
    operators (``GraphAPI.update_keys``): what ``AscendBackend(graph_runtime=...)`` takes."""
    cls = type("NPUGraph", (NPUGraph,), {"update_keys": dict(update_keys)})
    return SimpleNamespace(NPUGraph=cls, graph=graph, graph_pool_handle=graph_pool_handle)
