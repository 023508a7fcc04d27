"""Replay bundles: one HAL call, self-contained, for a bug report.

A bundle is a directory holding ``manifest.json`` (the operator, its attributes, where in the
model it ran, the tolerance it failed, the backends with versions and devices, the environment
fingerprint) and ``tensors.safetensors`` (every input the call read, and its outputs on each
side: the candidate, the float64 reference and, when there was one, the other backend). No
pickle: the tensors load anywhere safetensors does, and ``llm-core conformance replay DIR``
runs the call again on any backend (see :mod:`llm_conformance.replay`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from llm_hal import (
    AttentionMetadata,
    DType,
    LinearWeight,
    PenaltyMetadata,
    QuantScheme,
    SamplingMetadata,
)
from safetensors.torch import load_file, save_file

from llm_conformance.op_call import HostCall, HostData, KvCache

FORMAT = "llm-core-replay-bundle"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"

Outputs = list[tuple[str, torch.Tensor]]
_METADATA: dict[str, type] = {
    "attention_metadata": AttentionMetadata,
    "sampling_metadata": SamplingMetadata,
    "penalty_metadata": PenaltyMetadata,
}


class BundleError(ValueError):
    """A directory that is not a replay bundle this version reads."""


@dataclass(slots=True)
class Bundle:
    """A loaded bundle: its manifest and tensors."""

    path: pathlib.Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def op(self) -> str:
        return str(self.manifest["op"])

    def call(self) -> HostCall:
        """The recorded call, every argument on the host."""
        args = {n: self._decode(v) for n, v in self.manifest["arguments"].items()}
        return HostCall(self.op, args)

    def outputs(self, side: str) -> Outputs:
        """The recorded outputs of ``candidate``, ``reference`` or ``against`` (empty if none)."""
        return [
            (o["name"], self.tensors[o["tensor"]]) for o in self.manifest["outputs"].get(side, [])
        ]

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Bundle:
        directory = pathlib.Path(path)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{directory} is not a replay bundle: it has no {MANIFEST}")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{manifest_path} is not a {FORMAT} manifest")
        if int(manifest.get("version", 0)) > VERSION:
            raise BundleError(
                f"{directory} is a version {manifest['version']} bundle; this llm-conformance "
                f"reads versions up to {VERSION}: upgrade it"
            )
        return cls(directory, manifest, load_file(str(directory / TENSORS)))

    def _decode(self, entry: dict[str, Any]) -> Any:
        kind = entry["kind"]
        if kind == "value":
            return entry["value"]
        if kind == "dtype":
            return DType(entry["value"])
        if kind == "tensor":
            return self.tensors[entry["tensor"]]
        if kind == "kv_cache":
            return KvCache(self.tensors[entry["tensor"]])
        if kind == "host_data":
            return HostData(self.tensors[entry["tensor"]])
        if kind == "list":
            return [self._decode(item) for item in entry["items"]]
        if kind == "linear_weight":
            parts = {p: self._decode(entry[p]) for p in ("weight", "bias", "scales", "zeros")}
            return LinearWeight(
                scheme=QuantScheme(entry["scheme"]),
                out_features=entry["out_features"],
                in_features=entry["in_features"],
                group_size=entry["group_size"],
                **parts,
            )
        if kind in _METADATA:
            fields = {n: self.tensors[k].numpy() for n, k in entry["arrays"].items()}
            return _METADATA[kind](**fields, **entry.get("values", {}))
        raise BundleError(f"unknown argument kind {kind!r} in {self.path / MANIFEST}")


def write_bundle(
    directory: str | pathlib.Path,
    call: HostCall,
    outputs: dict[str, Outputs],
    context: dict[str, Any],
) -> pathlib.Path:
    """Write ``call`` with its ``outputs`` per side and ``context`` (merged into the manifest:
    backends, environment, where it ran, the comparison) as a bundle in ``directory``."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    arguments = {name: _encode(f"arg.{name}", v, tensors) for name, v in call.args.items()}
    recorded = {
        side: [
            {**_tensor_entry(f"out.{side}.{name}", t, tensors), "name": name} for name, t in outs
        ]
        for side, outs in outputs.items()
        if outs
    }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "op": call.op,
        "arguments": arguments,
        "attributes": call.attributes(),
        "outputs": recorded,
        **context,
        "replay": f"llm-core conformance replay {path}",
    }
    save_file(tensors, str(path / TENSORS))
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def _encode(key: str, value: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if isinstance(value, KvCache):
        return {**_tensor_entry(key, value.tensor, tensors), "kind": "kv_cache"}
    if isinstance(value, HostData):
        return {**_tensor_entry(key, value.tensor, tensors), "kind": "host_data"}
    if isinstance(value, torch.Tensor):
        return _tensor_entry(key, value, tensors)
    if isinstance(value, LinearWeight):
        return {
            "kind": "linear_weight",
            "scheme": value.scheme.value,
            "out_features": value.out_features,
            "in_features": value.in_features,
            "group_size": value.group_size,
            **{
                p: _encode(f"{key}.{p}", getattr(value, p), tensors)
                for p in ("weight", "bias", "scales", "zeros")
            },
        }
    if isinstance(value, AttentionMetadata | SamplingMetadata | PenaltyMetadata):
        kind = next(k for k, cls in _METADATA.items() if isinstance(value, cls))
        arrays, values = {}, {}
        for f in dataclasses.fields(value):
            name, field_value = f.name, getattr(value, f.name)
            if isinstance(field_value, np.ndarray):
                tensors[f"{key}.{name}"] = torch.from_numpy(np.array(field_value, copy=True))
                arrays[name] = f"{key}.{name}"
            elif name != "device_cache":
                values[name] = field_value
        return {"kind": kind, "arrays": arrays, "values": values}
    if isinstance(value, DType):
        return {"kind": "dtype", "value": value.value}
    if isinstance(value, tuple | list):
        return {
            "kind": "list",
            "items": [_encode(f"{key}.{i}", v, tensors) for i, v in enumerate(value)],
        }
    if value is None or isinstance(value, bool | int | float | str):
        return {"kind": "value", "value": value}
    raise TypeError(f"cannot write {type(value).__name__} ({key}) into a replay bundle")


def _tensor_entry(key: str, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors[key] = t.detach().contiguous().clone()
    return {
        "kind": "tensor",
        "tensor": key,
        "dtype": str(t.dtype).replace("torch.", ""),
        "shape": list(t.shape),
    }
