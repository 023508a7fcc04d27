"""A strict check of a ``.safetensors`` file's header, done before ``safetensors`` opens it.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length
``N``, ``N`` bytes of JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets":
[begin, end]}`` (offsets relative to the end of the header), then the data, tensor after tensor
with no gaps. ``SafetensorsHeader.read`` checks all of it against the file size and raises
``CheckpointError`` naming the tensor or field and what is wrong; the safetensors library's own
errors ("MetadataIncompleteBuffer", ...) name neither.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from dataclasses import dataclass
from typing import Any, NoReturn

from llm_core.loaders.checkpoint import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers

#: Bits per element of every dtype the format defines.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

_REDOWNLOAD = "The file is incomplete or corrupt: download or save it again."


@dataclass(frozen=True, slots=True)
class SafetensorsEntry:
    """One tensor of the header; ``start`` is its absolute offset in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A safetensors file's header, checked: every tensor lies inside the file, no gaps."""

    path: pathlib.Path
    tensors: dict[str, SafetensorsEntry]  # in the order of the file's data

    @classmethod
    def read(cls, path: pathlib.Path) -> SafetensorsHeader:
        """Read and check the header of ``path``.

        Raises:
            CheckpointError: the file cannot be read, its header length or JSON is invalid, a
                tensor's dtype is unknown, its shape and byte range disagree, its data lies
                beyond the end of the file, or the tensors overlap or leave gaps; the message
                names the tensor or field.
        """

        def fail(what: str) -> NoReturn:
            _fail(path, what)

        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    fail(
                        f"truncated: the header length needs 8 bytes at offset 0, file has "
                        f"{size}. {_REDOWNLOAD}"
                    )
                (length,) = struct.unpack("<Q", prefix)
                if length > MAX_HEADER_BYTES:
                    fail(
                        f"the header length is {length} bytes, more than the "
                        f"{MAX_HEADER_BYTES} allowed: the first 8 bytes are corrupt or this "
                        "is not a safetensors file."
                    )
                if 8 + length > size:
                    fail(
                        f"truncated: the JSON header needs {length} bytes at offset 8, file "
                        f"has {size}. {_REDOWNLOAD}"
                    )
                text = f.read(length)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read the file ({exc}).") from exc

        try:
            header = json.loads(text.decode("utf-8"))
        except UnicodeDecodeError as exc:
            fail(f"the JSON header is not UTF-8 ({exc}). {_REDOWNLOAD}")
        except json.JSONDecodeError as exc:
            fail(
                f"the JSON header is invalid at line {exc.lineno}, column {exc.colno}: "
                f"{exc.msg}. {_REDOWNLOAD}"
            )
        if not isinstance(header, dict):
            fail(f"the JSON header is a {type(header).__name__}, not an object. {_REDOWNLOAD}")

        data_start = 8 + length
        tensors: dict[str, SafetensorsEntry] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                if not isinstance(entry, dict):
                    fail("the __metadata__ field is not an object of strings.")
                continue
            tensors[name] = _entry(path, name, entry, data_start, size)

        ordered = sorted(tensors.items(), key=lambda item: (item[1].start, item[1].nbytes))
        expected, previous = data_start, "the header"
        for name, entry in ordered:
            if entry.start != expected:
                relation = "overlaps" if entry.start < expected else "leaves a gap after"
                fail(
                    f"the data of tensor {name} (from offset {entry.start}) {relation} "
                    f"{previous} (ending at offset {expected}): a dtype, shape or data_offsets "
                    f"entry is wrong. {_REDOWNLOAD}"
                )
            expected, previous = entry.start + entry.nbytes, f"tensor {name}"
        if expected != size:
            fail(
                f"{size - expected} bytes follow the last tensor's data (ends at offset "
                f"{expected}, file has {size}): the header is corrupt. {_REDOWNLOAD}"
            )
        return cls(path, dict(ordered))


def _entry(
    path: pathlib.Path,
    name: str,
    entry: Any,
    data_start: int,
    size: int,
) -> SafetensorsEntry:
    def fail(what: str) -> NoReturn:
        _fail(path, what)

    where = f"tensor {name}"
    if not isinstance(entry, dict):
        fail(f"{where}: its header entry is not an object.")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            fail(f"{where}: the header entry has no '{field}' field. {_REDOWNLOAD}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        fail(f"{where} has unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)}). {_REDOWNLOAD}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        fail(f"{where} has shape {shape!r}, not a list of non-negative integers.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        fail(f"{where} has data_offsets {offsets!r}, not [begin, end], two non-negative integers.")
    begin, end = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    nbytes = bits // 8
    if bits % 8 or end - begin != nbytes:
        fail(
            f"{where} ({dtype}, shape {shape}) needs {nbytes} bytes but its data_offsets "
            f"[{begin}, {end}] span {end - begin}: the header is corrupt. {_REDOWNLOAD}"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated: tensor {name} needs {nbytes} bytes at offset "
            f"{data_start + begin}, file has {size}. {_REDOWNLOAD}"
        )
    return SafetensorsEntry(dtype, tuple(shape), data_start + begin, nbytes)


def _fail(path: pathlib.Path, what: str) -> NoReturn:
    raise CheckpointError(f"{path}: not a readable safetensors file: {what}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
