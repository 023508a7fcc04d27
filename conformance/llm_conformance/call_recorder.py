"""A backend proxy that records every HAL call a model makes, for ``llm-core conformance diff``.

:class:`CallRecorder` is a :class:`llm_hal.Backend` that forwards every method to the backend
it wraps, like :class:`~llm_conformance.tracing.RecordingBackend`, and for each checked call
(:data:`~llm_conformance.op_call.RECORDED`) keeps a :class:`CallRecord`: op, place (layer),
step, digests and statistics of its inputs and outputs, and, when given an
:class:`EqualInputsCheck`, how its outputs compare with the reference on the same inputs.

Layers are found from the call stream and the model, not from the engine: the engine knows
nothing of the suite. Once the engine is built, :meth:`CallRecorder.serve` maps every weight
and KV cache of ``model.layers[i]`` (and of the engine's ``kv_caches[i]``) to layer ``i``; a
call whose weight or cache belongs to a layer is in that layer, one with none (rotary, split,
silu_and_mul) is where the previous call was. Each ``embedding`` call starts a forward step.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from llm_hal import AttentionMetadata, Backend, LinearWeight

from llm_conformance.call_record import CallRecord, TensorSummary
from llm_conformance.equal_inputs import EqualInputsCheck, Rerun
from llm_conformance.op_call import (
    RECORDED,
    HostCall,
    HostMemo,
    bind,
    capture,
    is_tensor,
    outputs_of,
)

_RECORDED = frozenset(RECORDED)
_DELEGATED = frozenset(n for n in dir(Backend) if not n.startswith("__")) - _RECORDED

#: The arguments that say which layer a call belongs to.
_IDENTIFYING: dict[str, tuple[str, ...]] = {
    "embedding": ("table",),
    "linear": ("weight",),
    "rms_norm": ("weight",),
    "gemma_rms_norm": ("weight",),
    "layer_norm": ("weight", "bias"),
    "reshape_and_cache": ("key_cache", "value_cache"),
    "paged_attention_prefill": ("key_cache", "value_cache"),
    "paged_attention_decode": ("key_cache", "value_cache"),
    "moe_experts": ("w13", "w2"),
}
#: Operators on logits after the forward pass.
SAMPLING_OPS = frozenset(
    {"apply_penalties", "apply_token_bans", "apply_token_bitmask", "sample", "compute_logprobs"}
)
_HEAD = "head"

#: ``on_call(record, call, outputs, rerun)``: every recorded call, with its host tensors, which
#: are dropped after it returns.
OnCall = Callable[[CallRecord, HostCall, list[tuple[str, torch.Tensor]], Rerun | None], None]


@dataclass(slots=True)
class StepInfo:
    """Where the tokens of one forward step are: what turns a row into a token position."""

    positions: np.ndarray  # (T,) position of each new token
    last: np.ndarray  # (B,) position of each sequence's last token
    slot_mapping: np.ndarray  # (T,)
    block_size: int

    @classmethod
    def of(cls, meta: AttentionMetadata) -> StepInfo:
        starts, lens = meta.query_start_loc, meta.seq_lens
        positions = [
            np.arange(int(lens[b]) - (int(starts[b + 1]) - int(starts[b])), int(lens[b]))
            for b in range(meta.num_seqs)
        ]
        return cls(
            np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64),
            meta.seq_lens.astype(np.int64) - 1,
            meta.slot_mapping.copy(),
            meta.block_size,
        )

    def position(self, op: str, shape: Sequence[int], index: Sequence[int]) -> int | None:
        """The token position of element ``index`` of an output of ``shape``, when the output
        has a row per token (or per sequence, or is a KV cache)."""
        if not index or not shape:
            return None
        if op == "reshape_and_cache" and len(index) >= 2:
            slot = int(index[0]) * self.block_size + int(index[1])
            hits = np.nonzero(self.slot_mapping == slot)[0]
            if len(hits):
                return int(self.positions[hits[0]])
            return None
        rows, tokens = int(shape[0]), len(self.positions)
        if tokens and rows == tokens:
            return int(self.positions[index[0]])
        if rows == len(self.last):
            return int(self.last[index[0]])
        if tokens and rows % tokens == 0:  # per-head rows (q/k norms): (T * heads, D)
            return int(self.positions[index[0] // (rows // tokens)])
        return None


class CallRecorder(Backend):
    """``inner`` with every checked call recorded in ``records``."""

    def __init__(
        self,
        inner: Backend,
        check: EqualInputsCheck | None = None,
        on_call: OnCall | None = None,
        memory: int = 1 << 30,
    ):
        self.inner = inner
        self.check = check
        self.on_call = on_call
        self.records: list[CallRecord] = []
        self.steps: dict[int, StepInfo] = {}
        self.serving = False
        self._owners: dict[int, int | str] = {}
        self._owned: list[Any] = []  # keeps the owners' objects (and their ids) alive
        self._step = -1
        self._where = "load"
        self._counts: Counter[tuple[Any, ...]] = Counter()
        self._memo = HostMemo(memory)

    def __getattribute__(self, attr: str) -> Any:
        if attr in _RECORDED:
            if attr == "from_host" and object.__getattribute__(self, "serving"):
                # Host bookkeeping of each step (ids, positions): the ops that read it record it.
                return object.__getattribute__(self, "inner").from_host
            return object.__getattribute__(self, "_recorded")(attr)
        if attr in _DELEGATED:
            return getattr(object.__getattribute__(self, "inner"), attr)
        return object.__getattribute__(self, attr)

    def __getattr__(self, attr: str) -> Any:
        # Anything the inner backend offers beyond the contract (a torch device, a TP group).
        return getattr(self.inner, attr)

    def serve(self, model: Any, kv_caches: Sequence[tuple[Any, Any]]) -> None:
        """The model is loaded: map its weights and caches to layers; calls from now on are
        attributed to steps and layers."""
        for obj in _members(model, skip=("layers", "backend")):
            self._own(obj, _HEAD)
        for i, layer in enumerate(getattr(model, "layers", None) or []):
            for obj in _members(layer):
                self._own(obj, i)
        for i, pair in enumerate(kv_caches):
            for cache in pair:
                self._own(cache, i)
        self.serving = True
        self._where = "embedding"

    def _own(self, obj: Any, owner: int | str) -> None:
        self._owners[id(obj)] = owner
        self._owned.append(obj)

    def _recorded(self, op: str) -> Callable[..., Any]:
        method = getattr(self.inner, op)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(op, method, args, kwargs)

        return call

    def _call(
        self, op: str, method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        arguments = bind(op, args, kwargs)
        record = self._place(op, arguments)
        host = capture(self.inner, op, arguments, self._memo)
        record.inputs = [TensorSummary.of(n, t, stats=False) for n, t in host.tensors()]
        record.attributes = host.attributes()
        self.records.append(record)
        try:
            result = method(*args, **kwargs)
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            raise
        outputs = [(n, self.inner.to_host(t)) for n, t in outputs_of(op, arguments, result)]
        # Loading: the weights' digests and statistics; a sketch (drift) only while serving.
        record.outputs = [TensorSummary.of(n, t, sketched=self.serving) for n, t in outputs]
        rerun = self.check.check(record, host, outputs) if self.check is not None else None
        if self.on_call is not None:
            self.on_call(record, host, outputs, rerun)
        return result

    def _place(self, op: str, arguments: dict[str, Any]) -> CallRecord:
        """A new record, placed in its step and layer."""
        key: tuple[Any, ...]
        if not self.serving:
            key = (None, "load", op)
            self._counts[key] += 1
            return CallRecord(len(self.records), op, "load", None, None, self._counts[key] - 1)
        owner = next(
            (
                self._owners[id(arguments[name])]
                for name in _IDENTIFYING.get(op, ())
                if id(arguments.get(name)) in self._owners
            ),
            None,
        )
        if op == "embedding":
            self._step += 1
            self._where = "embedding"
        elif op in SAMPLING_OPS:
            self._where = "sampling"
        elif isinstance(owner, int):
            self._where = f"layer {owner}"
        elif owner == _HEAD:
            self._where = _HEAD
        meta = arguments.get("meta")
        if isinstance(meta, AttentionMetadata) and self._step not in self.steps:
            self.steps[self._step] = StepInfo.of(meta)
        step = max(self._step, 0)
        key = (step, self._where, op)
        self._counts[key] += 1
        layer = int(self._where.split()[1]) if self._where.startswith("layer ") else None
        return CallRecord(len(self.records), op, self._where, step, layer, self._counts[key] - 1)


def _members(obj: Any, skip: Sequence[str] = ()) -> Iterator[Any]:
    """The weights and tensors an object holds (a model, one of its layers): its attributes
    that are tensors or prepared linear weights, also inside lists, tuples and dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in skip]
    else:
        names = set(getattr(obj, "__dict__", {})) | set(getattr(type(obj), "__slots__", ()))
        values = [getattr(obj, n, None) for n in sorted(names) if n not in skip]
    for value in values:
        if isinstance(value, dict):
            items = list(value.values())
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            items = [value]
        yield from (i for i in items if isinstance(i, LinearWeight) or is_tensor(i))
