"""Rewrite a GGUF file with its weights in BF16 or F32, for the llama.cpp baseline.

llm-core dequantizes a quantized GGUF (the demo model is Q4_1) and computes in bf16 or fp32;
to compare llama.cpp on the same numbers, it must run the same weights in the same dtype. The
export dequantizes every tensor with the ``gguf`` package, rounds matrices to the target type
(1-D tensors stay F32, as llama.cpp's converters write them) and copies every metadata field
(tokenizer included), so the files differ only in how the weights are stored. Exports are
cached next to the other llm-core downloads.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile

import numpy as np

log = logging.getLogger("llm_core.bench")

#: gguf's ``general.file_type`` values (llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_BF16).
_FILE_TYPES = {"f32": 0, "bf16": 32}


def export_gguf(
    src: str | pathlib.Path, ftype: str, cache_dir: pathlib.Path | None = None
) -> pathlib.Path:
    """The path of ``src`` rewritten with ``ftype`` ("bf16" or "f32") weights, made once."""
    import gguf

    if ftype not in _FILE_TYPES:
        raise ValueError(
            f"cannot export GGUF weights as {ftype!r}; use one of {sorted(_FILE_TYPES)}"
        )
    src = pathlib.Path(src)
    stat = src.stat()
    cache = (
        cache_dir
        or pathlib.Path(
            os.environ.get("LLM_CORE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "llm-core"
        )
        / "bench"
    )
    dst = cache / f"{src.stem}.{stat.st_size}-{int(stat.st_mtime)}.{ftype.upper()}.gguf"
    if dst.is_file():
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    log.info("writing %s weights of %s to %s", ftype, src.name, dst)
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    fd, tmp = tempfile.mkstemp(suffix=".gguf", dir=cache)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(_FILE_TYPES[ftype])
        target = (
            gguf.GGMLQuantizationType.BF16 if ftype == "bf16" else gguf.GGMLQuantizationType.F32
        )
        for tensor in reader.tensors:
            data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
            if data.ndim < 2 or target == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tensor.name, data)
            else:
                raw = gguf.quants.quantize(data, target)
                writer.add_tensor(tensor.name, raw, raw_dtype=target)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst
