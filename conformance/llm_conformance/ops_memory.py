"""Checks of the device contract the model uses on every step: host transfers with dtype
conversion, copies, views and the KV-cache allocation. Conversions must round exactly like
torch (to nearest, ties to even), so truncating bf16 conversions fail here."""

from __future__ import annotations

import numpy as np
import torch
from llm_hal import DType
from llm_hal.dtypes import to_torch

from llm_conformance.cases import Params, op_check
from llm_conformance.compare import Check
from llm_conformance.harness import F64, Harness

_SHAPES = [(1, 8), (7, 80), (33, 576), (5, 13)]

FROM_HOST: list[Params] = [
    {"tokens": t, "width": w, "source": src}
    for t, w in _SHAPES
    for src in ("float32", "float64", "numpy")
]
FROM_HOST += [
    {"tokens": 4, "width": 32, "source": "float32", "inject": "nan"},
    {"tokens": 4, "width": 32, "source": "float32", "inject": "inf"},
    {"tokens": 64, "width": 1, "source": "int64"},
    # Exactly halfway between two neighbours of the tested dtype (random values hardly ever
    # are): ties go to the even one. A conversion that rounds half away from zero, as
    # ``(bits + 0x8000) >> 16`` does for bf16, gets half of them wrong.
    {"tokens": 16, "width": 64, "source": "float32", "ties": True},
    {"tokens": 16, "width": 64, "source": "float64", "ties": True},
]


def _ties(h: Harness, shape: tuple[int, int]) -> torch.Tensor:
    """Values of which half lie exactly halfway between two neighbours in the tested dtype
    (exact in float32 too for bf16 and fp16 targets)."""
    base = (torch.randn(shape, generator=h.gen, dtype=F64) * 3).to(h.torch_dtype)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    neighbour = (base.view(ints[base.element_size()]) + 1).view(h.torch_dtype)  # away from 0
    mid = (base.to(F64) + neighbour.to(F64)) / 2
    tie = torch.rand(shape, generator=h.gen) < 0.5
    return torch.where(tie, mid, base.to(F64))


@op_check("from_host", "exact", FROM_HOST)
def _from_host(h: Harness, p: Params) -> None:
    shape = (p["tokens"], p["width"])
    if p["source"] == "int64":
        ids = h.randint(-5, 50_000, shape)
        got = h.backend.from_host(ids, DType.INT64)
        want_ids = ids.clone()
        ids.fill_(7)
        h.expect_dtype("output", got, DType.INT64)
        h.same("output (host data overwritten after the call)", got, want_ids)
        return
    random = torch.randn(shape, generator=h.gen, dtype=F64) * 3
    src = _ties(h, shape) if p.get("ties") else random
    h.inject(src, kind=p.get("inject"))
    host: torch.Tensor | np.ndarray = src
    if p["source"] == "float32":
        host = src.float()
    elif p["source"] == "numpy":
        host = src.float().numpy()
    want = torch.as_tensor(host).to(h.torch_dtype).to(F64, copy=True)  # nearest even
    got = h.backend.from_host(host, h.dtype)
    # A copy, never an alias: overwriting the host data afterwards must not change it.
    host[...] = 7.0
    h.expect_dtype("output", got, h.dtype)
    h.close("converted (host data overwritten after the call)", got, want)


TO_HOST: list[Params] = [{"tokens": t, "width": w} for t, w in _SHAPES]
TO_HOST += [{"tokens": 3, "width": 40, "strided": True}, {"tokens": 6, "width": 8, "inject": "nan"}]


@op_check("to_host", "exact", TO_HOST)
def _to_host(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["tokens"], p["width"]))
    h.inject(x, x64, kind=p.get("inject"))
    dev = h.strided(x) if p.get("strided") else h.up(x)
    got = h.backend.to_host(dev)
    ok = isinstance(got, torch.Tensor) and got.dtype == h.torch_dtype and got.is_contiguous()
    h.add(
        Check(
            "host tensor", ok, "" if ok else f"got {type(got).__name__} {getattr(got, 'dtype', '')}"
        )
    )
    if isinstance(got, torch.Tensor):
        got.fill_(7.0)  # a copy, never the device memory: the device keeps its values
    h.close("values (an earlier copy overwritten)", dev, x64)


COPY: list[Params] = [
    {"tokens": t, "width": w, "direction": d}
    for t, w in _SHAPES
    for d in ("from_fp32", "to_fp32", "same")
]


@op_check("copy_", "exact", COPY)
def _copy(h: Harness, p: Params) -> None:
    t, w = p["tokens"], p["width"]
    be = h.backend
    if p["direction"] == "from_fp32":
        src_host = torch.randn((t, w), generator=h.gen, dtype=torch.float32) * 3
        dst_dtype = h.dtype
    elif p["direction"] == "to_fp32":
        src_host = h.randn((t, w), 3.0)[0]
        dst_dtype = DType.FP32
    else:
        src_host = h.randn((t, w), 3.0)[0]
        dst_dtype = h.dtype
    want = src_host.to(to_torch(dst_dtype)).to(F64)
    src = h.up(src_host)
    guarded = h.guarded(t, w, dst_dtype)
    result = be.copy_(guarded.view, src)
    h.close("result", result, want, dtype=dst_dtype)
    h.close("destination", guarded.view, want, dtype=dst_dtype)
    h.guard_intact("guard", guarded)
    plain = be.copy_(be.empty((t, w), dst_dtype), src)
    h.close("into empty()", plain, want, dtype=dst_dtype)


RESHAPE: list[Params] = [
    {"tokens": 1, "heads": 1, "head_size": 8},
    {"tokens": 7, "heads": 4, "head_size": 64},
    {"tokens": 33, "heads": 9, "head_size": 64},
    {"tokens": 5, "heads": 2, "head_size": 80, "strided": True},
]


@op_check("reshape", "exact", RESHAPE)
def _reshape(h: Harness, p: Params) -> None:
    t, heads, d = p["tokens"], p["heads"], p["head_size"]
    x, x64 = h.randn((t, heads * d))
    dev = h.strided(x) if p.get("strided") else h.up(x)
    per_head = h.backend.reshape(dev, (t * heads, d))
    h.expect_dtype("to (T*H, D)", per_head, h.dtype)
    h.close("to (T*H, D)", per_head, x64.reshape(t * heads, d))
    back = h.backend.reshape(per_head, (-1, heads * d))
    h.close("back with -1", back, x64)


SPLIT: list[Params] = [
    {"tokens": 1, "sizes": [8, 8]},
    {"tokens": 7, "sizes": [256, 64, 64]},
    {"tokens": 5, "sizes": [576, 192, 192]},
    {"tokens": 3, "sizes": [1, 7, 13, 2]},
]


@op_check("split", "exact", SPLIT)
def _split(h: Harness, p: Params) -> None:
    sizes = p["sizes"]
    x, x64 = h.randn((p["tokens"], sum(sizes)))
    parts = h.backend.split(h.up(x), sizes)
    if len(parts) != len(sizes):
        h.add(Check("parts", False, f"{len(parts)} parts, want {len(sizes)}"))
        return
    for i, (part, want) in enumerate(zip(parts, torch.split(x64, sizes, dim=-1), strict=True)):
        h.close(f"part {i}", part, want)


KV_CACHE: list[Params] = [
    {"blocks": 1, "block_size": 16, "kv_heads": 1, "head_size": 64},
    {"blocks": 7, "block_size": 16, "kv_heads": 2, "head_size": 80},
    {"blocks": 3, "block_size": 32, "kv_heads": 8, "head_size": 128},
]


@op_check("allocate_kv_cache", "exact", KV_CACHE)
def _allocate_kv_cache(h: Harness, p: Params) -> None:
    shape = (p["blocks"], p["block_size"], p["kv_heads"], p["head_size"])
    caches = h.backend.allocate_kv_cache(*shape, h.dtype)
    for name, cache in zip(("key", "value"), caches, strict=True):
        h.expect_dtype(f"{name} cache", cache, h.dtype)
        h.close(f"{name} cache zero-filled", cache, torch.zeros(shape, dtype=F64))
    # Two tensors, not one: filling the key cache leaves the value cache zero.
    h.backend.copy_(caches[0], h.up(torch.ones(shape, dtype=h.torch_dtype)))
    h.close("key cache written", caches[0], torch.ones(shape, dtype=F64))
    h.close("value cache apart from the key cache", caches[1], torch.zeros(shape, dtype=F64))
