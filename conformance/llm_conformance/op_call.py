"""One HAL call moved to the host, so it can run again anywhere: on the float64 reference, on
another backend, or from a replay bundle on another machine.

:func:`capture` copies every argument of a call to the host before the call runs (in-place
operators overwrite theirs); :func:`execute` uploads a :class:`HostCall` to a backend through
the HAL alone (``from_host``, ``prepare_linear``, and for paged KV caches the backend's own
``allocate_kv_cache`` and ``reshape_and_cache``, since a backend may keep its cache in a private
layout), runs it and brings the outputs back; :func:`reference_outputs` runs it on the float64
oracle, applying the roundings the contract mandates, as the operator level does.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from llm_hal import (
    OPS,
    AttentionMetadata,
    Backend,
    LinearWeight,
    LogprobsResult,
    PenaltyMetadata,
    SamplingMetadata,
    TorchBackend,
)
from llm_hal.dtypes import from_torch
from llm_hal.reference import dtype_rounded

#: The calls the diff records and checks: every HAL operator, and the device-contract methods
#: that move or convert model data (``from_host`` only while a model loads: its weights).
RECORDED: tuple[str, ...] = ("from_host", "copy_", "reshape", "split", *OPS)

#: Operators that return None and write their results into these arguments.
IN_PLACE_OUTPUTS: dict[str, tuple[str, ...]] = {"reshape_and_cache": ("key_cache", "value_cache")}

#: Arguments holding a paged KV cache (logical layout ``(blocks, block_size, Hkv, D)``).
KV_ARGUMENTS = frozenset({"key_cache", "value_cache"})

#: Arguments that never change while a model is served (weights and tables): copied to the
#: host, and uploaded to another backend, once per object.
STATIC_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "embedding": ("table",),
    "linear": ("weight",),
    "rms_norm": ("weight",),
    "gemma_rms_norm": ("weight",),
    "layer_norm": ("weight", "bias"),
    "rotary_embedding": ("cos_sin_cache",),
    "moe_experts": ("w13", "w2"),
}

#: Names of the parts of a tuple result.
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "rms_norm": ("y", "residual"),
    "gemma_rms_norm": ("y", "residual"),
    "rotary_embedding": ("q", "k"),
    "moe_route": ("weights", "ids"),
}

Metadata = AttentionMetadata | SamplingMetadata | PenaltyMetadata
_METADATA = (AttentionMetadata, SamplingMetadata, PenaltyMetadata)


class CacheUploadError(RuntimeError):
    """A backend's ``reshape_and_cache`` did not store a host cache faithfully, so a call that
    reads a KV cache cannot be rebuilt on it."""


@dataclass(slots=True)
class KvCache:
    """A paged KV cache argument on the host, in its logical layout."""

    tensor: torch.Tensor


@dataclass(slots=True)
class HostData:
    """``from_host``'s host-side argument: given to a rerun as it is, never uploaded."""

    tensor: torch.Tensor


@dataclass(slots=True)
class HostCall:
    """A HAL call with every argument on the host, in the operator's parameter order."""

    op: str
    args: dict[str, Any]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every host tensor of the arguments, with a dotted name (``weight.bias``)."""
        for name, value in self.args.items():
            yield from _named_tensors(name, value)

    def attributes(self) -> dict[str, Any]:
        """The arguments that are not tensors, as JSON-friendly values."""
        out: dict[str, Any] = {}
        for name, value in self.args.items():
            if isinstance(value, LinearWeight):
                out[name] = {
                    "scheme": value.scheme.value,
                    "out_features": value.out_features,
                    "in_features": value.in_features,
                    "group_size": value.group_size,
                }
            elif isinstance(value, AttentionMetadata):
                out[name] = {
                    "num_seqs": value.num_seqs,
                    "num_tokens": value.num_tokens,
                    "max_seq_len": value.max_seq_len,
                    "block_size": value.block_size,
                    "is_decode": value.is_decode,
                }
            elif isinstance(value, _METADATA):
                out[name] = type(value).__name__
            elif not _holds_tensor(value):
                out[name] = _plain(value)
        return out

    @property
    def kv_len(self) -> int:
        """The longest context an attention call reads (scales the attention NMSE cap)."""
        meta = self.args.get("meta")
        return meta.max_seq_len if isinstance(meta, AttentionMetadata) else 0


class HostMemo:
    """Host copies (or uploads) of objects that do not change, by identity, within a byte
    budget (least recently used first out). Holds each key object, so its id stays unique."""

    def __init__(self, budget: int = 1 << 30):
        self.budget = budget
        self._entries: OrderedDict[int, tuple[Any, Any, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Any, make: Callable[[Any], Any]) -> Any:
        entry = self._entries.get(id(key))
        if entry is not None and entry[0] is key:
            self._entries.move_to_end(id(key))
            return entry[1]
        value = make(key)
        size = _nbytes(key) + _nbytes(value)  # host tensors: device memory is not counted
        if size <= self.budget:
            self._entries[id(key)] = (key, value, size)
            self._bytes += size
            while self._bytes > self.budget:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return value


@functools.cache
def signature(op: str) -> inspect.Signature:
    """The contract's signature of ``op`` (``self`` included)."""
    return inspect.signature(getattr(Backend, op))


def bind(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by parameter name, in order, defaults filled in."""
    bound = signature(op).bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self")
    return arguments


def is_tensor(value: Any) -> bool:
    """A backend-native tensor handle (anything with a shape and a dtype but a numpy array)."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.ndarray)


def capture(
    backend: Backend, op: str, arguments: dict[str, Any], memo: HostMemo | None = None
) -> HostCall:
    """Copy the arguments of a call of ``op`` on ``backend`` to the host (before it runs)."""
    static = STATIC_ARGUMENTS.get(op, ())
    args: dict[str, Any] = {}
    for name, value in arguments.items():
        if op == "from_host" and name == "data":
            host = torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
            args[name] = HostData(host.detach().clone())
        elif name in KV_ARGUMENTS and is_tensor(value):
            args[name] = KvCache(backend.to_host(value))
        elif name in static and memo is not None and value is not None:
            args[name] = memo.get(value, lambda v: _to_host(backend, v))
        else:
            args[name] = _to_host(backend, value)
    return HostCall(op, args)


def outputs_of(op: str, arguments: dict[str, Any], result: Any) -> list[tuple[str, Any]]:
    """The output tensors of a call, named: its result's parts, or the arguments an in-place
    operator wrote when it returns None."""
    if result is None:
        return [(name, arguments[name]) for name in IN_PLACE_OUTPUTS.get(op, ())]
    if isinstance(result, LogprobsResult):
        return [(f.name, getattr(result, f.name)) for f in dataclasses.fields(result)]
    if isinstance(result, tuple | list):
        prefix = "part" if op == "split" else "out"
        names = OUTPUT_NAMES.get(op) or tuple(f"{prefix}{i}" for i in range(len(result)))
        return [(n, r) for n, r in zip(names, result, strict=False) if r is not None]
    return [("out", result)]


def execute(
    backend: Backend, call: HostCall, *, upcast: bool = False, memo: HostMemo | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Run ``call`` on ``backend`` and return its outputs on the host. ``upcast``: floating
    inputs become float64 (the oracle's precision). Raises what the backend raises, and
    :class:`CacheUploadError` when a KV cache cannot be rebuilt on it."""
    static = STATIC_ARGUMENTS.get(call.op, ())
    caches = {n: v.tensor for n, v in call.args.items() if isinstance(v, KvCache)}
    uploaded = upload_kv_caches(backend, caches, upcast) if caches else {}
    device: dict[str, Any] = {}  # in the operator's parameter order: the call is positional
    for name, value in call.args.items():
        if name in uploaded:
            device[name] = uploaded[name]
        elif name in static and memo is not None and value is not None:
            device[name] = memo.get(value, lambda v: _upload(backend, v, upcast))
        else:
            device[name] = _upload(backend, value, upcast)
    result = getattr(backend, call.op)(*device.values())
    return [(name, backend.to_host(t)) for name, t in outputs_of(call.op, device, result)]


def reference_outputs(
    call: HostCall, oracle: TorchBackend, memo: HostMemo | None = None
) -> list[tuple[str, torch.Tensor]]:
    """What the float64 oracle answers for ``call``, with the roundings the contract mandates
    (the norms round the residual sum to the activation dtype before normalizing; ``scale``
    rounds its factor to it)."""
    args = call.args
    if call.op in ("rms_norm", "gemma_rms_norm") and args.get("residual") is not None:
        x, residual = args["x"], args["residual"]
        exact = x.to(torch.float64) + residual.to(torch.float64)
        rounded = HostCall(call.op, {**args, "x": exact.to(x.dtype), "residual": None})
        (y,) = execute(oracle, rounded, upcast=True, memo=memo)
        return [y, ("residual", exact)]
    if call.op == "scale":
        factor = dtype_rounded(args["factor"], args["x"].dtype)
        return execute(oracle, HostCall("scale", {**args, "factor": factor}), upcast=True)
    return execute(oracle, call, upcast=True, memo=memo)


def upload_kv_caches(
    backend: Backend, caches: dict[str, torch.Tensor], upcast: bool
) -> dict[str, Any]:
    """Key and value caches rebuilt on ``backend`` from their host copies: allocated with
    ``allocate_kv_cache`` and filled with ``reshape_and_cache`` over every slot, then read back
    to check the backend stored them faithfully (the contract lets a backend keep its own
    layout, so ``from_host`` of the logical layout would not do)."""
    key = caches.get("key_cache")
    value = caches.get("value_cache")
    if key is None or value is None:
        raise ValueError("a call with a KV cache has both the key and the value cache")
    if upcast:
        key, value = key.to(torch.float64), value.to(torch.float64)
    blocks, block_size, heads, head_size = key.shape
    slots = blocks * block_size
    key_cache, value_cache = backend.allocate_kv_cache(
        blocks, block_size, heads, head_size, from_torch(key.dtype)
    )
    meta = AttentionMetadata(
        query_start_loc=np.array([0, slots]),
        seq_lens=np.array([slots]),
        block_tables=np.arange(blocks).reshape(1, blocks),
        slot_mapping=np.arange(slots),
        block_size=block_size,
    )
    backend.reshape_and_cache(
        backend.from_host(key.reshape(slots, heads * head_size)),
        backend.from_host(value.reshape(slots, heads * head_size)),
        key_cache,
        value_cache,
        meta,
    )
    for name, device, host in (("key", key_cache, key), ("value", value_cache, value)):
        back = backend.to_host(device)
        if back.shape != host.shape or not torch.equal(_bits(back), _bits(host)):
            raise CacheUploadError(
                f"{backend.name}: reshape_and_cache did not store a {name} cache faithfully "
                "(written slot by slot, read back with to_host, it differs): the calls that "
                "read a KV cache cannot be rebuilt on this backend"
            )
    return {"key_cache": key_cache, "value_cache": value_cache}


def copy_metadata(meta: Metadata) -> Metadata:
    """A copy with its own arrays and an empty ``device_cache`` (a rerun on another backend,
    or on the same one, must not see device copies cached by the original call)."""
    values: dict[str, Any] = {
        f.name: np.array(getattr(meta, f.name), copy=True)
        for f in dataclasses.fields(meta)
        if f.name != "device_cache" and isinstance(getattr(meta, f.name), np.ndarray)
    }
    if isinstance(meta, AttentionMetadata):
        return AttentionMetadata(**values, block_size=meta.block_size)
    return type(meta)(**values)


def _to_host(backend: Backend, value: Any) -> Any:
    if isinstance(value, LinearWeight):
        return dataclasses.replace(
            value,
            weight=_to_host(backend, value.weight),
            bias=_to_host(backend, value.bias),
            scales=_to_host(backend, value.scales),
            zeros=_to_host(backend, value.zeros),
            packed=None,  # the backend's private form stays private
        )
    if isinstance(value, _METADATA):
        return copy_metadata(value)
    if is_tensor(value):
        return backend.to_host(value)
    if isinstance(value, tuple | list):
        return type(value)(_to_host(backend, v) for v in value)
    return value


def _upload(backend: Backend, value: Any, upcast: bool) -> Any:
    if isinstance(value, HostData):
        return value.tensor
    if isinstance(value, torch.Tensor):
        return backend.from_host(_up(value, upcast))
    if isinstance(value, LinearWeight):
        return backend.prepare_linear(
            _upload(backend, value.weight, upcast),
            _upload(backend, value.bias, upcast),
            value.scheme,
            _upload(backend, value.scales, upcast),
            _upload(backend, value.zeros, upcast),
            value.group_size,
        )
    if isinstance(value, _METADATA):
        return copy_metadata(value)
    if isinstance(value, tuple | list):
        return type(value)(_upload(backend, v, upcast) for v in value)
    return value


def _up(t: torch.Tensor, upcast: bool) -> torch.Tensor:
    return t.to(torch.float64) if upcast and t.is_floating_point() else t


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _named_tensors(name: str, value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, KvCache | HostData):
        yield name, value.tensor
    elif isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, LinearWeight):
        for part in ("weight", "bias", "scales", "zeros"):
            yield from _named_tensors(f"{name}.{part}" if name else part, getattr(value, part))
    elif isinstance(value, tuple | list):
        for i, v in enumerate(value):
            yield from _named_tensors(f"{name}.{i}", v)


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in _named_tensors("", value))


def _holds_tensor(value: Any) -> bool:
    return next(_named_tensors("", value), None) is not None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and isinstance(value.value, str):  # an enum: DType, QuantScheme
        return value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)
