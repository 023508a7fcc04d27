"""Corrupt checkpoints: every bad file ends in one ``CheckpointError`` that names what is wrong.

A corpus built from a tiny valid GGUF file and a tiny safetensors checkpoint: files cut at many
offsets, flipped header bytes (magic, version, counts, types, dimensions, offsets, names), wrong
metadata, NaN weights, broken config.json and tokenizer files. Each is opened and loaded the
way the engine does (``open_checkpoint``, every tensor, the tokenizer); the error must be a
``CheckpointError`` naming the file and, per case, the tensor or field and what is wrong, never
another exception type. The CLI turns it into one ``llm-core: error:`` line.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import gguf
import pytest
from conftest_loaders import (
    build_tiny_tokenizer,
    save_tiny_hf_checkpoint,
    tiny_model,
    write_tiny_gguf,
)
from llm_core.loaders import CheckpointError, open_checkpoint

Q = gguf.GGMLQuantizationType
Mutation = Callable[[bytearray], None]


def load_like_the_engine(path: pathlib.Path) -> None:
    """What ``LLMEngine`` does with a checkpoint: open it, read every tensor, the tokenizer."""
    checkpoint = open_checkpoint(path)
    for _ in checkpoint.tensors():
        pass
    checkpoint.load_tokenizer()


def expect_checkpoint_error(path: pathlib.Path, *words: str, file: str | None = None) -> str:
    """Loading ``path`` fails with a CheckpointError naming ``file`` (default: ``path``'s
    name) and every one of ``words``."""
    try:
        load_like_the_engine(path)
    except CheckpointError as exc:
        message = str(exc)
    except Exception as exc:  # the failure this file exists to catch
        pytest.fail(f"{path.name}: {type(exc).__name__} instead of CheckpointError: {exc}")
    else:
        pytest.fail(f"{path.name}: loaded without an error")
    assert (file or path.name) in message, message
    assert "\n" not in message, message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in: {message}"
    return message


# --- a tiny GGUF file and where its parts lie --------------------------------------------------


class GGUFLayout:
    """Offsets of the parts of a valid GGUF file, read with the gguf package."""

    def __init__(self, path: pathlib.Path) -> None:
        reader = gguf.GGUFReader(path)
        self.size = path.stat().st_size
        self.data_offset = int(reader.data_offset)
        self._fields = reader.fields
        self.kv_count = len(reader.fields) - 3  # GGUF.version, .tensor_count, .kv_count
        self.tensors = {t.name: t for t in reader.tensors}
        self.tensor_order = [t.name for t in reader.tensors]

    def key(self, key: str) -> int:
        """Offset of a metadata entry (its key length)."""
        return int(self._fields[key].offset)

    def value_type(self, key: str) -> int:
        return self.key(key) + 8 + len(key.encode())

    def value(self, key: str) -> int:
        return self.value_type(key) + 4

    def info(self, name: str) -> int:
        """Offset of a tensor's entry in the tensor table (its name length)."""
        return int(self.tensors[name].field.offset)

    def n_dims(self, name: str) -> int:
        return self.info(name) + 8 + len(name.encode())

    def dim(self, name: str, index: int) -> int:
        return self.n_dims(name) + 4 + 8 * index

    def tensor_type(self, name: str) -> int:
        return self.dim(name, len(self.tensors[name].shape))

    def offset_field(self, name: str) -> int:
        return self.tensor_type(name) + 4

    def data(self, name: str) -> int:
        return int(self.tensors[name].data_offset)

    @property
    def tensor_table(self) -> int:
        return self.info(self.tensor_order[0])


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny llama GGUF with its tokenizer: F32 tensors, Q8_0 for the MLP weights."""
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    write_tiny_gguf(
        path,
        "llama",
        tiny_model("llama"),
        quantize=lambda name: Q.Q8_0 if ".mlp." in name else Q.F32,
        tokenizer=build_tiny_tokenizer(),
    )
    load_like_the_engine(path)  # the corpus starts from a file that loads
    return path


@pytest.fixture(scope="module")
def layout(good_gguf: pathlib.Path) -> GGUFLayout:
    return GGUFLayout(good_gguf)


def write_variant(
    good: pathlib.Path, directory: pathlib.Path, name: str, mutate: Mutation
) -> pathlib.Path:
    data = bytearray(good.read_bytes())
    mutate(data)
    path = directory / f"{name}.gguf"
    path.write_bytes(bytes(data))
    return path


def cut(at: int) -> Mutation:
    def mutate(data: bytearray) -> None:
        del data[at:]

    return mutate


def put(offset: int, fmt: str, value: object) -> Mutation:
    def mutate(data: bytearray) -> None:
        struct.pack_into(fmt, data, offset, value)

    return mutate


def replace(old: bytes, new: bytes) -> Mutation:
    def mutate(data: bytearray) -> None:
        at = data.index(old)
        data[at : at + len(old)] = new

    return mutate


# --- GGUF: cut at many offsets ------------------------------------------------------------------


def test_gguf_cut_anywhere_says_truncated(
    good_gguf: pathlib.Path, layout: GGUFLayout, tmp_path: pathlib.Path
) -> None:
    points = set(range(0, 64))  # magic, version, counts, the first key
    points |= set(range(64, layout.data_offset, 37))  # the metadata and the tensor table
    points |= set(range(layout.data_offset, layout.size, layout.size // 40))  # the data
    points |= {
        layout.key("tokenizer.ggml.tokens") + 40,  # inside the vocabulary array
        layout.value("tokenizer.chat_template") + 20,
        layout.tensor_table,
        layout.tensor_table + 5,
        layout.data_offset,
        layout.size - 1,
    }
    for at in sorted(points):
        path = write_variant(good_gguf, tmp_path, f"cut-{at}", cut(at))
        expect_checkpoint_error(path, "truncated")
        path.unlink()


def test_gguf_cut_in_the_data_names_the_tensor(
    good_gguf: pathlib.Path, layout: GGUFLayout, tmp_path: pathlib.Path
) -> None:
    at = layout.data("blk.1.ffn_up.weight") + 100
    path = write_variant(good_gguf, tmp_path, "mid-data", cut(at))
    expect_checkpoint_error(
        path, "truncated: tensor blk.1.ffn_up.weight", "needs", f"file has {at}"
    )


def test_gguf_cut_at_the_last_byte_names_the_last_tensor(
    good_gguf: pathlib.Path, layout: GGUFLayout, tmp_path: pathlib.Path
) -> None:
    last = max(layout.tensor_order, key=layout.data)
    path = write_variant(good_gguf, tmp_path, "last-byte", cut(layout.size - 1))
    expect_checkpoint_error(path, f"truncated: tensor {last}", f"file has {layout.size - 1}")


# --- GGUF: flipped header bytes, wrong counts, bad version -----------------------------------

GGUF_CASES: dict[str, tuple[Callable[[GGUFLayout], Mutation], tuple[str, ...]]] = {
    "magic": (lambda lay: replace(b"GGUF", b"GGUX"), ("magic", "GGUX")),
    "magic-zeroed": (lambda lay: put(0, "<I", 0), ("magic",)),
    "version-1": (lambda lay: put(4, "<I", 1), ("version 1",)),
    "version-7": (lambda lay: put(4, "<I", 7), ("version 7",)),
    "version-big-endian": (lambda lay: put(4, ">I", 3), ("big-endian",)),
    "tensor-count-huge": (lambda lay: put(8, "<Q", 1 << 40), ("truncated", "tensors")),
    "kv-count-huge": (lambda lay: put(16, "<Q", 1 << 40), ("truncated", "metadata entries")),
    "tensor-count-plus-one": (
        lambda lay: put(8, "<Q", len(lay.tensors) + 1),
        ("tensor #", "empty name"),
    ),
    "tensor-count-minus-one": (
        lambda lay: put(8, "<Q", len(lay.tensors) - 1),
        ("follow the last tensor",),
    ),
    "kv-count-minus-one": (
        lambda lay: put(16, "<Q", lay.kv_count - 1),
        ("dimensions",),
    ),
    "kv-count-plus-one": (lambda lay: put(16, "<Q", lay.kv_count + 1), ("tensor #0",)),
    "key-length-huge": (
        lambda lay: put(lay.key("llama.block_count"), "<Q", 1 << 50),
        ("truncated", "metadata key #"),
    ),
    "value-type-unknown": (
        lambda lay: put(lay.value_type("llama.block_count"), "<I", 99),
        ("llama.block_count", "unknown value type 99"),
    ),
    "value-type-float": (
        lambda lay: put(lay.value_type("llama.block_count"), "<I", 6),
        ("llama.block_count", "expected an integer"),
    ),
    "array-length-huge": (
        lambda lay: put(lay.value("tokenizer.ggml.tokens") + 4, "<Q", 1 << 40),
        ("truncated", "tokenizer.ggml.tokens"),
    ),
    "string-in-array-length-huge": (
        lambda lay: put(lay.value("tokenizer.ggml.tokens") + 12, "<Q", 1 << 40),
        ("truncated", "tokenizer.ggml.tokens", "string"),
    ),
    "block-count-zero": (
        lambda lay: put(lay.value("llama.block_count"), "<I", 0),
        ("llama.block_count", "at least 1"),
    ),
    "block-count-too-many": (
        lambda lay: put(lay.value("llama.block_count"), "<I", 3),
        ("blk.2.", "missing", "num_hidden_layers=3"),
    ),
    "block-count-too-few": (
        lambda lay: put(lay.value("llama.block_count"), "<I", 1),
        ("blk.1.", "layer 1", "num_hidden_layers=1"),
    ),
    "embedding-length": (
        lambda lay: put(lay.value("llama.embedding_length"), "<I", 96),
        ("shape", "hidden_size=96"),
    ),
    "feed-forward-length": (
        lambda lay: put(lay.value("llama.feed_forward_length"), "<I", 256),
        ("ffn_", "shape", "intermediate_size=256"),
    ),
    "head-count": (
        lambda lay: put(lay.value("llama.attention.head_count"), "<I", 3),
        ("LlamaConfig", "attention heads (3)"),
    ),
    "rms-eps-nan": (
        lambda lay: put(lay.value("llama.attention.layer_norm_rms_epsilon"), "<f", float("nan")),
        ("layer_norm_rms_epsilon",),
    ),
    "eos-out-of-vocab": (
        lambda lay: put(lay.value("tokenizer.ggml.eos_token_id"), "<I", 70000),
        ("tokenizer.ggml.eos_token_id", "70000", "vocabulary size"),
    ),
    "architecture": (
        lambda lay: put(lay.value("general.architecture") + 8, "<B", ord("x")),
        ("architecture 'xlama' is not supported",),
    ),
    "architecture-not-utf8": (
        lambda lay: put(lay.value("general.architecture") + 8, "<B", 0xFF),
        ("general.architecture",),
    ),
    "key-not-utf8": (
        lambda lay: put(lay.key("llama.block_count") + 8, "<B", 0xFF),
        ("metadata key #", "UTF-8"),
    ),
    "tokens-key-renamed": (
        lambda lay: put(lay.key("tokenizer.ggml.tokens") + 8 + 20, "<B", ord("z")),
        ("tokenizer.ggml.tokens", "missing"),
    ),
    "tensor-name-length": (
        lambda lay: put(lay.info("blk.0.attn_k.weight"), "<Q", 1 << 45),
        ("truncated", "tensor #"),
    ),
    "tensor-name-layer": (
        lambda lay: replace(b"blk.1.ffn_down.weight", b"blk.7.ffn_down.weight"),
        ("blk.7.ffn_down.weight", "layer 7"),
    ),
    "tensor-name-unknown": (
        lambda lay: replace(b"blk.1.attn_v.weight", b"blk.1.attn_x.weight"),
        ("blk.1.attn_x.weight", "no Hugging Face counterpart"),
    ),
    "tensor-name-not-utf8": (
        lambda lay: put(lay.info("blk.0.attn_k.weight") + 8, "<B", 0xFE),
        ("tensor #", "UTF-8"),
    ),
    "tensor-n-dims": (
        lambda lay: put(lay.n_dims("blk.0.attn_q.weight"), "<I", 7),
        ("blk.0.attn_q.weight", "7 dimensions"),
    ),
    "tensor-dim-huge": (
        lambda lay: put(lay.dim("blk.0.attn_q.weight", 1), "<Q", 1 << 40),
        ("truncated", "blk.0.attn_q.weight", "needs"),
    ),
    "tensor-dim-larger": (
        lambda lay: put(lay.dim("blk.0.attn_q.weight", 1), "<Q", 65),
        ("blk.0.attn_q.weight", "overlaps"),
    ),
    "tensor-dim-smaller": (
        lambda lay: put(lay.dim("blk.0.attn_q.weight", 1), "<Q", 32),
        ("blk.0.attn_q.weight", "shape [32, 64]", "expected [64, 64]"),
    ),
    "tensor-dim-not-a-block": (
        lambda lay: put(lay.dim("blk.0.ffn_up.weight", 0), "<Q", 63),
        ("blk.0.ffn_up.weight", "block size 32"),
    ),
    "tensor-type-unknown": (
        lambda lay: put(lay.tensor_type("blk.0.attn_k.weight"), "<I", 99),
        ("blk.0.attn_k.weight", "unknown tensor type 99"),
    ),
    "tensor-type-f64": (
        lambda lay: put(lay.tensor_type("blk.1.attn_norm.weight"), "<I", int(Q.F64)),
        ("blk.1.attn_norm.weight",),
    ),
    "tensor-type-unconvertible": (
        lambda lay: put(lay.tensor_type("blk.1.attn_norm.weight"), "<I", int(Q.I32)),
        ("blk.1.attn_norm.weight", "I32", "cannot dequantize"),
    ),
    "tensor-offset-unaligned": (
        lambda lay: put(lay.offset_field("blk.1.attn_q.weight"), "<Q", 8),
        ("blk.1.attn_q.weight", "alignment"),
    ),
    "tensor-offset-huge": (
        lambda lay: put(lay.offset_field("blk.1.attn_q.weight"), "<Q", 1 << 40),
        ("truncated", "blk.1.attn_q.weight"),
    ),
    "tensor-offset-overlaps": (
        lambda lay: put(lay.offset_field("blk.1.attn_q.weight"), "<Q", 0),
        ("overlaps",),
    ),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_corrupt_header(
    good_gguf: pathlib.Path, layout: GGUFLayout, tmp_path: pathlib.Path, case: str
) -> None:
    make, words = GGUF_CASES[case]
    path = write_variant(good_gguf, tmp_path, case, make(layout))
    expect_checkpoint_error(path, *words)


def test_gguf_nan_weight_is_refused_naming_the_tensor(
    good_gguf: pathlib.Path, layout: GGUFLayout, tmp_path: pathlib.Path
) -> None:
    at = layout.data("blk.1.attn_output.weight") + 4 * 70  # F32: element 70, row 1
    path = write_variant(good_gguf, tmp_path, "nan", put(at, "<f", float("nan")))
    message = expect_checkpoint_error(path, "blk.1.attn_output.weight", "non-finite", "NaN")
    assert "index [1, 6]" in message


def test_gguf_infinite_quantization_scale_is_refused(
    good_gguf: pathlib.Path, layout: GGUFLayout, tmp_path: pathlib.Path
) -> None:
    # A Q8_0 block is an fp16 scale and 32 int8 values: an infinite scale.
    at = layout.data("blk.0.ffn_gate.weight")
    path = write_variant(good_gguf, tmp_path, "inf-scale", put(at, "<H", 0x7C00))
    expect_checkpoint_error(path, "blk.0.ffn_gate.weight", "non-finite")


def test_gguf_random_header_flips_never_escape(
    good_gguf: pathlib.Path, layout: GGUFLayout, tmp_path: pathlib.Path
) -> None:
    """Any byte of the header flipped: the file loads (a harmless byte) or a CheckpointError."""
    rng = random.Random(0)
    good = good_gguf.read_bytes()
    for trial in range(200):
        at = rng.randrange(layout.data_offset)
        data = bytearray(good)
        data[at] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip-{trial}-{at}.gguf"
        path.write_bytes(bytes(data))
        try:
            load_like_the_engine(path)
        except CheckpointError as exc:
            assert path.name in str(exc)
        except Exception as exc:
            pytest.fail(f"byte {at} flipped: {type(exc).__name__}: {exc}")
        path.unlink()


# --- safetensors checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("hf") / "good"
    save_tiny_hf_checkpoint(path, "llama")
    load_like_the_engine(path)
    return path


def hf_copy(good: pathlib.Path, directory: pathlib.Path, name: str) -> pathlib.Path:
    path = directory / name
    shutil.copytree(good, path)
    return path


def safetensors_layout(file: pathlib.Path) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the JSON header) of a safetensors file."""
    raw = file.read_bytes()
    (length,) = struct.unpack_from("<Q", raw)
    return 8 + length, json.loads(raw[8 : 8 + length])


def rewrite_header(file: pathlib.Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Change the JSON header, keeping the data as it is."""
    start, header = safetensors_layout(file)
    data = file.read_bytes()[start:]
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_safetensors_cut_anywhere_says_truncated(
    good_hf: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    weights = (good_hf / "model.safetensors").read_bytes()
    start, _ = safetensors_layout(good_hf / "model.safetensors")
    points = {0, 4, 7, 8, 9, start // 2, start - 1, start, start + 1, len(weights) - 1}
    points |= set(range(start, len(weights), len(weights) // 25))
    path = hf_copy(good_hf, tmp_path, "cut")
    for at in sorted(points):
        (path / "model.safetensors").write_bytes(weights[:at])
        expect_checkpoint_error(path, "truncated", file="model.safetensors")


def test_safetensors_cut_in_the_data_names_the_tensor(
    good_hf: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    file = good_hf / "model.safetensors"
    start, header = safetensors_layout(file)
    name = "model.layers.1.mlp.up_proj.weight"
    entry = header[name]
    assert isinstance(entry, dict)
    at = start + entry["data_offsets"][0] + 10
    path = hf_copy(good_hf, tmp_path, "cut")
    (path / "model.safetensors").write_bytes(file.read_bytes()[:at])
    expect_checkpoint_error(
        path, "truncated", f"tensor {name}", f"file has {at}", file="model.safetensors"
    )


def _set(name: str, field: str, value: object) -> Callable[[dict[str, object]], None]:
    def edit(header: dict[str, object]) -> None:
        entry = header[name]
        assert isinstance(entry, dict)
        entry[field] = value

    return edit


def _rename(old: str, new: str) -> Callable[[dict[str, object]], None]:
    def edit(header: dict[str, object]) -> None:
        header[new] = header.pop(old)

    return edit


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"

SAFETENSORS_CASES: dict[str, tuple[Callable[[pathlib.Path], object], tuple[str, ...]]] = {
    "header-length-huge": (
        lambda f: f.write_bytes(struct.pack("<Q", 1 << 40) + f.read_bytes()[8:]),
        ("header length",),
    ),
    "header-length-past-end": (
        lambda f: f.write_bytes(struct.pack("<Q", f.stat().st_size) + f.read_bytes()[8:]),
        ("truncated", "JSON header"),
    ),
    "header-length-minus-one": (
        lambda f: f.write_bytes(
            struct.pack("<Q", safetensors_layout(f)[0] - 9) + f.read_bytes()[8:]
        ),
        ("JSON header is invalid",),
    ),
    "header-not-json": (
        lambda f: f.write_bytes(f.read_bytes()[:8] + b"#" + f.read_bytes()[9:]),
        ("JSON header is invalid", "line 1, column 1"),
    ),
    "header-a-list": (lambda f: _write_raw_header(f, b"[1, 2]"), ("not an object",)),
    "dtype-unknown": (lambda f: rewrite_header(f, _set(Q_PROJ, "dtype", "F33")), (Q_PROJ, "F33")),
    "dtype-wrong-size": (
        lambda f: rewrite_header(f, _set(Q_PROJ, "dtype", "F16")),
        (Q_PROJ, "needs", "span"),
    ),
    "shape-wrong-count": (
        lambda f: rewrite_header(f, _set(Q_PROJ, "shape", [64, 65])),
        (Q_PROJ, "needs", "span"),
    ),
    "shape-not-ints": (
        lambda f: rewrite_header(f, _set(Q_PROJ, "shape", [64, "x"])),
        (Q_PROJ, "shape"),
    ),
    "shape-consistent-but-wrong": (
        lambda f: rewrite_header(f, _set(Q_PROJ, "shape", [32, 128])),
        (Q_PROJ, "shape [32, 128]", "expected [64, 64]"),
    ),
    "offsets-missing": (
        lambda f: rewrite_header(f, _set(Q_PROJ, "data_offsets", None)),
        (Q_PROJ, "data_offsets"),
    ),
    "offsets-past-end": (
        lambda f: rewrite_header(f, _set(Q_PROJ, "data_offsets", [1 << 30, (1 << 30) + 16384])),
        ("truncated", Q_PROJ),
    ),
    "offsets-overlap": (
        lambda f: rewrite_header(f, _set(Q_PROJ, "data_offsets", [0, 16384])),
        ("overlaps",),
    ),
    "tensor-renamed-to-another-layer": (
        lambda f: rewrite_header(f, _rename(Q_PROJ, Q_PROJ.replace(".0.", ".9."))),
        ("model.layers.9.self_attn.q_proj.weight", "layer 9"),
    ),
    "nan-weight": (lambda f: _poke_float(f, Q_PROJ, 5, float("nan")), (Q_PROJ, "non-finite")),
    "inf-weight": (lambda f: _poke_float(f, Q_PROJ, 0, float("-inf")), (Q_PROJ, "non-finite")),
    "trailing-bytes": (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 16), ("16 bytes",)),
}


def _write_raw_header(file: pathlib.Path, text: bytes) -> None:
    file.write_bytes(struct.pack("<Q", len(text)) + text)


def _poke_float(file: pathlib.Path, name: str, index: int, value: float) -> None:
    start, header = safetensors_layout(file)
    entry = header[name]
    assert isinstance(entry, dict) and entry["dtype"] == "F32"
    data = bytearray(file.read_bytes())
    struct.pack_into("<f", data, start + entry["data_offsets"][0] + 4 * index, value)
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_safetensors_corrupt(good_hf: pathlib.Path, tmp_path: pathlib.Path, case: str) -> None:
    corrupt, words = SAFETENSORS_CASES[case]
    path = hf_copy(good_hf, tmp_path, case)
    corrupt(path / "model.safetensors")
    expect_checkpoint_error(path, *words, file="model.safetensors")


# --- config.json, the shard index and the tokenizer ----------------------------------------------


def _edit_json(
    name: str, edit: Callable[[dict[str, object]], object]
) -> Callable[[pathlib.Path], None]:
    def corrupt(directory: pathlib.Path) -> None:
        file = directory / name
        fields = json.loads(file.read_text())
        edit(fields)
        file.write_text(json.dumps(fields))

    return corrupt


def _drop(field: str) -> Callable[[dict[str, object]], object]:
    return lambda fields: fields.pop(field)


def _assign(field: str, value: object) -> Callable[[dict[str, object]], object]:
    return lambda fields: fields.__setitem__(field, value)


def _write(name: str, text: str) -> Callable[[pathlib.Path], object]:
    return lambda directory: (directory / name).write_text(text)


def _delete(*names: str) -> Callable[[pathlib.Path], None]:
    def corrupt(directory: pathlib.Path) -> None:
        for name in names:
            (directory / name).unlink()

    return corrupt


DIRECTORY_CASES: dict[str, tuple[Callable[[pathlib.Path], object], str, tuple[str, ...]]] = {
    "config-invalid-json": (
        _write("config.json", '{"model_type": "llama",, }'),
        "config.json",
        ("invalid JSON", "line 1, column 24"),
    ),
    "config-empty": (_write("config.json", ""), "config.json", ("invalid JSON",)),
    "config-a-list": (_write("config.json", "[]"), "config.json", ("not an object",)),
    "config-no-model-type": (
        _edit_json("config.json", _drop("model_type")),
        "config.json",
        ("'model_type'", "missing"),
    ),
    "config-unknown-model-type": (
        _edit_json("config.json", _assign("model_type", "no-such-model")),
        "config.json",
        ("transformers cannot read it", "no-such-model"),
    ),
    "config-no-hidden-size": (
        _edit_json("config.json", _drop("hidden_size")),
        "config.json",
        ("'hidden_size'", "missing"),
    ),
    "config-layers-a-string": (
        _edit_json("config.json", _assign("num_hidden_layers", "two")),
        "config.json",
        ("'num_hidden_layers'", "'two'", "positive integer"),
    ),
    "config-layers-negative": (
        _edit_json("config.json", _assign("num_hidden_layers", -2)),
        "config.json",
        ("'num_hidden_layers'", "positive integer"),
    ),
    "config-too-many-layers": (
        _edit_json("config.json", _assign("num_hidden_layers", 3)),
        "good",  # the directory: the weights disagree with the config
        ("model.layers.2.", "missing", "num_hidden_layers=3"),
    ),
    "config-vocab-disagrees": (
        _edit_json("config.json", _assign("vocab_size", 301)),
        "good",
        ("vocab_size=301", "expected [301, 64]"),
    ),
    "config-architectures-a-string": (
        _edit_json("config.json", _assign("architectures", "LlamaForCausalLM")),
        "config.json",
        ("'architectures'",),
    ),
    "tokenizer-missing": (
        _delete("tokenizer.json"),
        "good",
        ("cannot load the tokenizer", "tokenizer.json"),
    ),
    "tokenizer-all-missing": (
        _delete("tokenizer.json", "tokenizer_config.json"),
        "good",
        ("cannot load the tokenizer",),
    ),
    "tokenizer-invalid-json": (
        _write("tokenizer.json", '{"version": '),
        "tokenizer.json",
        ("cannot load the tokenizer", "invalid JSON"),
    ),
    "tokenizer-config-invalid-json": (
        _write("tokenizer_config.json", "{oops}"),
        "tokenizer_config.json",
        ("cannot load the tokenizer", "invalid JSON"),
    ),
    "tokenizer-json-wrong-shape": (
        _write("tokenizer.json", '{"model": 3}'),
        "good",
        ("cannot load the tokenizer",),
    ),
}


@pytest.mark.parametrize("case", sorted(DIRECTORY_CASES))
def test_hf_directory_corrupt(good_hf: pathlib.Path, tmp_path: pathlib.Path, case: str) -> None:
    corrupt, named, words = DIRECTORY_CASES[case]
    path = hf_copy(good_hf, tmp_path, "good")
    corrupt(path)
    message = expect_checkpoint_error(path, *words)
    assert named in message


SHARD_INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("sharded") / "good"
    save_tiny_hf_checkpoint(path, "llama", max_shard_size="40KB")
    return path


@pytest.mark.parametrize(
    ("case", "text", "words"),
    [
        ("invalid-json", '{"weight_map": ', ("invalid JSON",)),
        ("no-weight-map", "{}", ("weight_map",)),
        ("weight-map-a-list", '{"weight_map": []}', ("weight_map",)),
    ],
)
def test_shard_index_corrupt(
    sharded_hf: pathlib.Path, tmp_path: pathlib.Path, case: str, text: str, words: tuple[str, ...]
) -> None:
    path = hf_copy(sharded_hf, tmp_path, case)
    (path / SHARD_INDEX).write_text(text)
    message = expect_checkpoint_error(path, *words)
    assert SHARD_INDEX in message


def test_shard_index_naming_the_wrong_shard(
    sharded_hf: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    path = hf_copy(sharded_hf, tmp_path, "wrong-shard")
    index = json.loads((path / SHARD_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][Q_PROJ] = next(s for s in shards if s != index["weight_map"][Q_PROJ])
    (path / SHARD_INDEX).write_text(json.dumps(index))
    expect_checkpoint_error(path, Q_PROJ, "does not hold it")


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_prints_one_error_line_for_a_corrupt_gguf(
    good_gguf: pathlib.Path, layout: GGUFLayout, tmp_path: pathlib.Path, command: str
) -> None:
    path = write_variant(
        good_gguf, tmp_path, "corrupt", cut(layout.data("blk.1.ffn_up.weight") + 7)
    )
    args = (
        ["generate", "--model", str(path), "hi"] if command == "generate" else ["serve", str(path)]
    )
    result = subprocess.run(
        [sys.executable, "-m", "llm_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llm-core: error:")]
    assert len(errors) == 1, result.stderr
    assert "truncated: tensor blk.1.ffn_up.weight needs" in errors[0]
    assert str(path) in errors[0]
