"""A strict walk over a GGUF file's header, done before ``gguf.GGUFReader`` sees the file.

The reader trusts every length and count it reads, so a cut or corrupt file ends in an
``IndexError`` or numpy's "cannot reshape array". ``GGUFHeader.read`` checks each of them
against the file size first (magic, version, counts, every metadata key and value, every tensor's
name, dimensions, type, offset and data range) and raises ``CheckpointError`` naming the key or
tensor, the offset and what is wrong. The layout is that of GGUF versions 2 and 3
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian.
"""

from __future__ import annotations

import itertools
import mmap
import pathlib
import struct
from dataclasses import dataclass
from typing import NoReturn

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from llm_core.loaders.checkpoint import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8  # GGUF allows arrays of arrays; no real file nests this deep

_FIXED_HEADER = 24  # magic, version, tensor count, metadata count
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value (the key may be empty)
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (no dims)

#: Bytes of each scalar metadata type; STRING and ARRAY have their own layout.
_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}
_MIN_VALUE_BYTES = {**_SCALAR_SIZES, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_REDOWNLOAD = "The file is incomplete or corrupt: download or convert it again."


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """One entry of the tensor table; ``start`` and ``nbytes`` locate its data in the file."""

    name: str
    tensor_type: GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF order: innermost (ne0) first
    start: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    """A GGUF file's header, checked against the file: every tensor lies inside the file."""

    version: int
    alignment: int
    data_offset: int  # where the data section starts
    file_size: int
    tensors: tuple[GGUFTensorInfo, ...]

    @classmethod
    def read(cls, path: pathlib.Path) -> GGUFHeader:
        """Walk and check the header of ``path``.

        Raises:
            CheckpointError: the file cannot be read, is not GGUF, is big-endian, has a version
                other than 2 or 3, or any count, length, type, dimension or offset in it does
                not fit the file; the message names the key or tensor and the offset.
        """
        try:
            with path.open("rb") as f:
                size = path.stat().st_size
                head = f.read(_FIXED_HEADER)
                _check_fixed_header(path, head, size)
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    return _Walker(path, buf, size).walk()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read the file ({exc}).") from exc


def _check_fixed_header(path: pathlib.Path, head: bytes, size: int) -> None:
    if len(head) >= 4 and head[:4] != GGUF_MAGIC:
        raise CheckpointError(
            f"{path}: not a readable GGUF file: bad magic {head[:4]!r} (a GGUF file starts "
            f"with {GGUF_MAGIC!r}). Pass a .gguf file written by llama.cpp or the gguf package."
        )
    if len(head) < _FIXED_HEADER:
        raise CheckpointError(
            f"{path}: not a readable GGUF file: truncated: the header needs {_FIXED_HEADER} "
            f"bytes at offset 0, file has {size}. {_REDOWNLOAD}"
        )
    (version,) = _U32.unpack_from(head, 4)
    if version & 0xFFFF == 0 and int.from_bytes(head[4:8], "big") in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: a GGUF file of the other byte order (big-endian) is not supported."
        )
    if version not in SUPPORTED_VERSIONS:
        hint = (
            "GGUF version 1 files are no longer read: convert the model again with a current "
            "llama.cpp."
            if version == 1
            else "The header is corrupt, or the file is newer than this loader."
        )
        raise CheckpointError(
            f"{path}: not a readable GGUF file: unsupported GGUF version {version} (this loader "
            f"reads versions {' and '.join(map(str, SUPPORTED_VERSIONS))}). {hint}"
        )
    tensor_count, kv_count = struct.unpack_from("<QQ", head, 8)
    least = _FIXED_HEADER + kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES
    if least > size:
        raise CheckpointError(
            f"{path}: not a readable GGUF file: truncated or corrupt header: it declares "
            f"{tensor_count} tensors and {kv_count} metadata entries, which need at least "
            f"{least} bytes, file has {size}. {_REDOWNLOAD}"
        )


class _Walker:
    """Reads the header front to back; every read is checked against the file size."""

    def __init__(self, path: pathlib.Path, buf: mmap.mmap, size: int) -> None:
        self.path = path
        self.buf = buf
        self.size = size
        self.offset = 0

    def walk(self) -> GGUFHeader:
        (version,) = _U32.unpack_from(self.buf, 4)
        tensor_count, kv_count = struct.unpack_from("<QQ", self.buf, 8)
        self.offset = _FIXED_HEADER
        alignment = DEFAULT_ALIGNMENT
        keys: set[str] = set()
        for index in range(kv_count):
            key = self._string(f"metadata key #{index}", "the key")
            if key in keys:
                self._fail(f"metadata key {key!r} appears twice")
            keys.add(key)
            value_type = self._value_type(f"metadata key {key!r}", self._u32(f"{key!r}'s type"))
            if key == "general.alignment":
                alignment = self._alignment(value_type)
            else:
                self._skip_value(key, value_type, depth=0)

        infos = [self._tensor_info(index) for index in range(tensor_count)]
        data_offset = -(-self.offset // alignment) * alignment
        tensors = tuple(self._locate(info, data_offset, alignment) for info in infos)
        self._check_data(tensors, data_offset, alignment)
        return GGUFHeader(int(version), alignment, data_offset, self.size, tensors)

    # -- bounds-checked reads -------------------------------------------------------------------

    def _fail(self, what: str) -> NoReturn:
        raise CheckpointError(f"{self.path}: not a readable GGUF file: {what}. {_REDOWNLOAD}")

    def _need(self, nbytes: int, what: str) -> int:
        """Claim ``nbytes`` at the current offset; return where they start."""
        start = self.offset
        if start + nbytes > self.size:
            self._fail(
                f"truncated: {what} needs {nbytes} bytes at offset {start}, file has {self.size}"
            )
        self.offset = start + nbytes
        return start

    def _u32(self, what: str) -> int:
        return int(_U32.unpack_from(self.buf, self._need(4, what))[0])

    def _u64(self, what: str) -> int:
        return int(_U64.unpack_from(self.buf, self._need(8, what))[0])

    def _string(self, owner: str, what: str) -> str:
        length = self._u64(f"{owner}: the length of {what}")
        start = self._need(length, f"{owner}: {what} ({length} bytes)")
        raw = self.buf[start : start + length]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"{owner}: {what} is not UTF-8 ({raw[:32]!r})")

    def _value_type(self, owner: str, raw: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            self._fail(f"{owner} has unknown value type {raw} at offset {self.offset - 4}")

    # -- metadata values ------------------------------------------------------------------------

    def _skip_value(self, key: str, value_type: GGUFValueType, depth: int) -> None:
        owner = f"metadata key {key!r}"
        if value_type == GGUFValueType.STRING:
            length = self._u64(f"{owner}: the string length")
            self._need(length, f"{owner}: its string value ({length} bytes)")
        elif value_type == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                self._fail(f"{owner}: arrays nested more than {MAX_ARRAY_NESTING} deep")
            item_type = self._value_type(f"{owner}'s array", self._u32(f"{owner}: the item type"))
            count = self._u64(f"{owner}: the array length")
            least = count * _MIN_VALUE_BYTES[item_type]
            if self.offset + least > self.size:
                self._fail(
                    f"truncated: {owner} (an array of {count} {item_type.name} values) needs at "
                    f"least {least} bytes at offset {self.offset}, file has {self.size}"
                )
            if item_type in _SCALAR_SIZES:
                self.offset += least
            elif item_type == GGUFValueType.STRING:
                self._skip_strings(owner, count)
            else:
                for _ in range(count):
                    self._skip_value(key, item_type, depth + 1)
        else:
            self._need(_SCALAR_SIZES[value_type], f"{owner}: its {value_type.name.lower()} value")

    def _skip_strings(self, owner: str, count: int) -> None:
        # The hot loop of the walk (a vocabulary is 50k-250k strings): no helper calls.
        buf, size, offset, unpack = self.buf, self.size, self.offset, _U64.unpack_from
        for item in range(count):
            if offset + 8 > size or (offset := offset + 8 + unpack(buf, offset)[0]) > size:
                self._fail(
                    f"truncated: {owner}: string {item} of {count} runs past the end of the "
                    f"file (file has {size} bytes)"
                )
        self.offset = offset

    def _alignment(self, value_type: GGUFValueType) -> int:
        if value_type != GGUFValueType.UINT32:
            self._fail(f"general.alignment has type {value_type.name}, expected UINT32")
        alignment = self._u32("general.alignment's value")
        if alignment == 0 or alignment & (alignment - 1):
            self._fail(f"general.alignment is {alignment}, not a power of two")
        return alignment

    # -- the tensor table -----------------------------------------------------------------------

    def _tensor_info(self, index: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = self._string(f"tensor #{index}", "its name")
        if not name:
            self._fail(f"tensor #{index} has an empty name (a corrupt tensor table or count)")
        owner = f"tensor {name}"
        n_dims = self._u32(f"{owner}: the number of dimensions")
        if n_dims > MAX_DIMS:
            self._fail(f"{owner} has {n_dims} dimensions, at most {MAX_DIMS} are allowed")
        dims = tuple(self._u64(f"{owner}: dimension {i}") for i in range(n_dims))
        raw_type = self._u32(f"{owner}: the type")
        try:
            tensor_type = GGMLQuantizationType(raw_type)
            block_size, _ = GGML_QUANT_SIZES[tensor_type]
        except (ValueError, KeyError):
            self._fail(f"{owner} has unknown tensor type {raw_type} (a corrupt tensor table)")
        if dims and dims[0] % block_size:
            self._fail(
                f"{owner} has dimensions {list(dims)}: the first is not a multiple of the "
                f"{tensor_type.name} block size {block_size}"
            )
        offset = self._u64(f"{owner}: the data offset")
        return name, tensor_type, dims, offset

    def _locate(
        self,
        info: tuple[str, GGMLQuantizationType, tuple[int, ...], int],
        data_offset: int,
        alignment: int,
    ) -> GGUFTensorInfo:
        name, tensor_type, dims, offset = info
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        elements = 1
        for dim in dims:
            elements *= dim
        if offset % alignment:
            self._fail(
                f"tensor {name} has data offset {offset}, not a multiple of the alignment "
                f"{alignment} (a corrupt tensor table)"
            )
        return GGUFTensorInfo(
            name, tensor_type, dims, data_offset + offset, elements // block_size * type_size
        )

    def _check_data(
        self, tensors: tuple[GGUFTensorInfo, ...], data_offset: int, alignment: int
    ) -> None:
        """Every tensor inside the file, no two overlapping, nothing but padding after them."""
        names: set[str] = set()
        for tensor in tensors:
            if tensor.name in names:
                self._fail(f"tensor {tensor.name} appears twice in the tensor table")
            names.add(tensor.name)
        # In file order, so a cut names the tensor it cuts through.
        ordered = sorted(tensors, key=lambda t: (t.start, t.nbytes))
        for tensor in ordered:
            if tensor.start + tensor.nbytes > self.size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {tensor.name} needs {tensor.nbytes} bytes "
                    f"at offset {tensor.start}, file has {self.size}. {_REDOWNLOAD}"
                )
        nonempty = [t for t in ordered if t.nbytes]
        for first, second in itertools.pairwise(nonempty):
            if first.start + first.nbytes > second.start:
                self._fail(
                    f"the data of tensor {first.name} (bytes {first.start} to "
                    f"{first.start + first.nbytes}) overlaps tensor {second.name} (from "
                    f"{second.start}): a dimension or offset in the tensor table is wrong"
                )
        # Writers pad each tensor to the alignment and stop: more bytes after the last tensor
        # mean the tensor count or table lost entries (llama.cpp itself would not notice).
        end = max([data_offset] + [t.start + t.nbytes for t in nonempty])
        if self.size - end >= alignment:
            self._fail(
                f"{self.size - end} bytes follow the last tensor's data (which ends at offset "
                f"{end}): the tensor count or the tensor table is corrupt"
            )
