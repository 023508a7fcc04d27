"""Checks of the dense operators: embedding, linear (dense and quantized), norms (the Gemma
convention included), activations, add, scale, soft_cap, gather_rows and the single-process
collectives."""

from __future__ import annotations

import math
from typing import Any

import torch
from llm_hal import QuantScheme
from llm_hal.reference import dtype_rounded

from llm_conformance.cases import Params, op_check
from llm_conformance.compare import Check
from llm_conformance.harness import F64, Harness

# -------------------------------------------------------------------------------------------
# embedding
# -------------------------------------------------------------------------------------------

EMBEDDING: list[Params] = [
    {"vocab": 1, "tokens": 1, "hidden": 8},
    {"vocab": 7, "tokens": 5, "hidden": 80, "int32": True},
    {"vocab": 50, "tokens": 33, "hidden": 96},
    {"vocab": 300, "tokens": 64, "hidden": 64, "int32": True},
    {"vocab": 1000, "tokens": 128, "hidden": 576},
    {"vocab": 32000, "tokens": 7, "hidden": 128},
    {"vocab": 50, "tokens": 17, "hidden": 64, "inject": "inf"},
    {"vocab": 50, "tokens": 17, "hidden": 72, "inject": "nan"},
]


@op_check("embedding", "exact", EMBEDDING)
def _embedding(h: Harness, p: Params) -> None:
    table, table64 = h.randn((p["vocab"], p["hidden"]))
    h.inject(table, table64, kind=p.get("inject"), count=p["vocab"] // 10 + 1)
    ids = h.randint(0, p["vocab"], (p["tokens"],))
    if p["tokens"] > 1:  # the first and the last row of the table
        ids[0], ids[-1] = 0, p["vocab"] - 1
    if p.get("int32"):
        ids = ids.to(torch.int32)
    dev_ids, dev_table = h.up(ids), h.up(table)
    want = h.oracle.embedding(ids, table64)
    got = h.backend.embedding(dev_ids, dev_table)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.with_out(lambda out: h.backend.embedding(dev_ids, dev_table, out=out), want)


# -------------------------------------------------------------------------------------------
# linear
# -------------------------------------------------------------------------------------------

_DENSE = [
    (1, 16, 8),
    (1, 576, 1536),
    (5, 64, 96),
    (17, 80, 33),
    (3, 128, 256),
    (64, 576, 192),
    (16, 64, 300),
    (128, 96, 200),
]
_QUANT = [("w8a16", 32), ("w8a16", 0), ("w4a16", 16), ("w4a16", 64), ("w8a8", 0)]

LINEAR: list[Params] = [
    {"tokens": t, "k": k, "n": n, "bias": i % 2 == 0, "strided": i % 3 == 1}
    for i, (t, k, n) in enumerate(_DENSE)
]
LINEAR += [
    {"tokens": 4, "k": 64, "n": 32, "bias": True, "inject": "nan"},
    {"tokens": 4, "k": 64, "n": 32, "bias": False, "inject": "inf"},
    # A long reduction: accumulating in bf16/fp16 drifts far past the bound here.
    {"tokens": 3, "k": 8192, "n": 64, "bias": False},
]
LINEAR += [
    {"tokens": t, "k": k, "n": n, "bias": True, "scheme": scheme, "group": group}
    for scheme, group in _QUANT
    for t, k, n in ((1, 64, 16), (7, 128, 48))
]
# One token with an outlier feature of 300 among ordinary ones: per-token activation scales
# keep the other tokens exact, and the outlier token's small features are where rounding and
# truncation differ.
LINEAR += [
    {"tokens": 16, "k": 128, "n": 48, "bias": False, "scheme": "w8a8", "group": 0, "outlier": 300.0}
]


def _quantized(
    h: Harness, scheme: QuantScheme, n: int, k: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(weight, float64 scales, float64 zeros or None) in the documented layout of ``scheme``."""
    groups = k // group if group else 1
    if scheme is QuantScheme.W4A16:
        weight = torch.randint(0, 256, (n, k // 2), generator=h.gen, dtype=torch.uint8)
        scales = torch.rand((n, groups), generator=h.gen, dtype=F64) * 0.1 / math.sqrt(k) + 1e-3
        zeros = torch.randint(0, 16, (n, groups), generator=h.gen).to(F64)
        return weight, scales, zeros
    weight = torch.randint(-127, 128, (n, k), generator=h.gen, dtype=torch.int8)
    shape = (n, 1) if scheme is QuantScheme.W8A8 else (n, groups)
    scales = torch.rand(shape, generator=h.gen, dtype=F64) * 0.02 / math.sqrt(k) + 1e-4
    return weight, scales, None


def _linear_shape(p: Params) -> dict[str, Any]:
    return {"scheme": p["scheme"]} if "scheme" in p else {}


@op_check("linear", "linear", LINEAR, shape_of=_linear_shape)
def _linear(h: Harness, p: Params) -> None:
    t, k, n = p["tokens"], p["k"], p["n"]
    x, x64 = h.randn((t, k))
    h.inject(x, x64, kind=p.get("inject"))
    if p.get("outlier"):
        x[0, int(h.randint(0, k, (1,)))] = p["outlier"]
        x64 = x.to(F64)
    bias, bias64 = h.randn((n,)) if p["bias"] else (None, None)
    dev_bias = None if bias is None else h.up(bias)
    be, ref = h.backend, h.oracle
    if "scheme" in p:
        scheme = QuantScheme(p["scheme"])
        weight, scales64, zeros64 = _quantized(h, scheme, n, k, p["group"])
        scales = scales64.to(h.torch_dtype)
        zeros = None if zeros64 is None else zeros64.to(h.torch_dtype)
        prepared = be.prepare_linear(
            h.up(weight),
            dev_bias,
            scheme,
            h.up(scales),
            None if zeros is None else h.up(zeros),
            p["group"],
        )
        # The golden weight is the same quantized one, dequantized in float64.
        golden = ref.prepare_linear(
            weight,
            bias64,
            scheme,
            scales.to(F64),
            None if zeros is None else zeros.to(F64),
            p["group"],
        )
        op_class = "w8a8" if scheme is QuantScheme.W8A8 else "quantized"
    else:
        w, w64 = h.randn((n, k), 1 / math.sqrt(k))
        prepared = be.prepare_linear(h.up(w), dev_bias)
        golden = ref.prepare_linear(w64, bias64)
        op_class = "linear"
    dev_x = h.strided(x) if p.get("strided") else h.up(x)
    want = ref.linear(x64, golden)
    got = be.linear(dev_x, prepared)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want, op_class)
    h.unchanged("input x", dev_x, x)
    if op_class == "linear":
        h.with_out(lambda out: be.linear(dev_x, prepared, out=out), want)


# -------------------------------------------------------------------------------------------
# norms
# -------------------------------------------------------------------------------------------

_NORM_SHAPES = [(1, 8), (7, 80), (3, 96), (33, 576), (5, 4096), (16, 64)]
RMS_NORM: list[Params] = []
for _i, (_t, _hid) in enumerate(_NORM_SHAPES):
    RMS_NORM.append({"tokens": _t, "hidden": _hid, "eps": 1e-6, "strided": _i % 2 == 1})
    RMS_NORM.append({"tokens": _t, "hidden": _hid, "eps": 1e-5, "residual": True})
RMS_NORM += [
    # Activations the size of sqrt(eps): where eps is inside the square root shows.
    {"tokens": 9, "hidden": 64, "eps": 1e-5, "scale": 3e-3},
    {"tokens": 9, "hidden": 64, "eps": 1e-6, "scale": 1e-3, "residual": True},
    # Per-head q/k norm: a strided projection reshaped to (tokens * heads, head_size).
    {"tokens": 7, "hidden": 64, "eps": 1e-6, "heads": 4, "strided": True},
    {"tokens": 3, "hidden": 128, "eps": 1e-6, "heads": 2, "strided": True},
    {"tokens": 5, "hidden": 64, "eps": 1e-6, "inject": "nan"},
    {"tokens": 5, "hidden": 64, "eps": 1e-6, "residual": True, "inject": "nan"},
]


@op_check("rms_norm", "norm", RMS_NORM)
def _rms_norm(h: Harness, p: Params) -> None:
    t, hid, eps, heads = p["tokens"], p["hidden"], p["eps"], p.get("heads", 1)
    x, x64 = h.randn((t, hid * heads), p.get("scale", 1.0))
    h.inject(x, x64, kind=p.get("inject"))
    w, w64 = h.randn((hid,))
    be = h.backend
    dev_x = h.strided(x) if p.get("strided") else h.up(x)
    if heads > 1:
        dev_x = be.reshape(dev_x, (t * heads, hid))
        x, x64 = x.reshape(t * heads, hid), x64.reshape(t * heads, hid)
    dev_w = h.up(w)
    residual = p.get("residual", False)
    if residual:
        r, r64 = h.randn(tuple(x.shape), p.get("scale", 1.0))
        # The contract rounds the sum to the activation dtype: the oracle does too.
        s64 = (x64 + r64).to(h.torch_dtype).to(F64)
    else:
        s64 = x64
    want, _ = h.oracle.rms_norm(s64, w64, eps)
    y, s = be.rms_norm(dev_x, dev_w, eps, residual=h.up(r) if residual else None)
    h.expect_dtype("output", y, h.dtype)
    h.close("output", y, want)
    if residual:
        if s is None:
            h.add(Check("residual sum", False, "returned None; with a residual it returns s"))
        else:
            h.close("residual sum", s, x64 + r64, "elementwise")
    h.unchanged("input x", dev_x, x)
    h.with_out(
        lambda out: be.rms_norm(dev_x, dev_w, eps, residual=h.up(r) if residual else None, out=out),
        want,
        lambda res: res[0],
    )


# The Gemma convention (HAL 1.3): hidden sizes of Gemma 2/3 (2304) and odd ones, one row, the
# residual add on and off, and the per-head q/k norm of Gemma 3 (head size 256).
_GEMMA_NORM_SHAPES = [(1, 8), (7, 80), (3, 13), (33, 576), (5, 2304), (16, 64)]
GEMMA_RMS_NORM: list[Params] = []
for _i, (_t, _hid) in enumerate(_GEMMA_NORM_SHAPES):
    GEMMA_RMS_NORM.append({"tokens": _t, "hidden": _hid, "eps": 1e-6, "strided": _i % 2 == 1})
    GEMMA_RMS_NORM.append({"tokens": _t, "hidden": _hid, "eps": 1e-6, "residual": True})
GEMMA_RMS_NORM += [
    {"tokens": 9, "hidden": 64, "eps": 1e-6, "scale": 1e-3},
    {"tokens": 9, "hidden": 64, "eps": 1e-6, "scale": 1e-3, "residual": True},
    {"tokens": 7, "hidden": 64, "eps": 1e-6, "heads": 4, "strided": True},
    {"tokens": 3, "hidden": 256, "eps": 1e-6, "heads": 2, "strided": True},
    {"tokens": 5, "hidden": 64, "eps": 1e-6, "inject": "nan"},
    {"tokens": 5, "hidden": 64, "eps": 1e-6, "residual": True, "inject": "nan"},
]


@op_check("gemma_rms_norm", "norm", GEMMA_RMS_NORM)
def _gemma_rms_norm(h: Harness, p: Params) -> None:
    t, hid, eps, heads = p["tokens"], p["hidden"], p["eps"], p.get("heads", 1)
    x, x64 = h.randn((t, hid * heads), p.get("scale", 1.0))
    h.inject(x, x64, kind=p.get("inject"))
    w, w64 = h.randn((hid,), 0.5)  # an offset from one: (1 + w) crosses zero too
    be = h.backend
    dev_x = h.strided(x) if p.get("strided") else h.up(x)
    if heads > 1:
        dev_x = be.reshape(dev_x, (t * heads, hid))
        x, x64 = x.reshape(t * heads, hid), x64.reshape(t * heads, hid)
    dev_w = h.up(w)
    residual = p.get("residual", False)
    if residual:
        r, r64 = h.randn(tuple(x.shape), p.get("scale", 1.0))
        s64 = (x64 + r64).to(h.torch_dtype).to(F64)  # the contract rounds the sum
    else:
        s64 = x64
    want, _ = h.oracle.gemma_rms_norm(s64, w64, eps)
    y, s = be.gemma_rms_norm(dev_x, dev_w, eps, residual=h.up(r) if residual else None)
    h.expect_dtype("output", y, h.dtype)
    h.close("output", y, want)
    if residual:
        if s is None:
            h.add(Check("residual sum", False, "returned None; with a residual it returns s"))
        else:
            h.close("residual sum", s, x64 + r64, "elementwise")
    h.unchanged("input x", dev_x, x)
    h.with_out(
        lambda out: be.gemma_rms_norm(
            dev_x, dev_w, eps, residual=h.up(r) if residual else None, out=out
        ),
        want,
        lambda res: res[0],
    )


LAYER_NORM: list[Params] = [
    {"tokens": t, "hidden": hid, "bias": i % 2 == 0} for i, (t, hid) in enumerate(_NORM_SHAPES)
]
LAYER_NORM += [
    {"tokens": 4, "hidden": 96, "bias": True, "inject": "nan"},
    # A spread the size of sqrt(eps): where eps is inside the square root shows.
    {"tokens": 9, "hidden": 64, "bias": True, "std": 3e-3, "mean": 1e-2},
]


@op_check("layer_norm", "norm", LAYER_NORM)
def _layer_norm(h: Harness, p: Params) -> None:
    t, hid = p["tokens"], p["hidden"]
    x, x64 = h.randn((t, hid), p.get("std", 3.0))
    mean = p.get("mean", 1.0)
    x, x64 = (x64 + mean).to(h.torch_dtype), (x64 + mean).to(h.torch_dtype).to(F64)
    h.inject(x, x64, kind=p.get("inject"))
    w, w64 = h.randn((hid,))
    b, b64 = h.randn((hid,)) if p["bias"] else (None, None)
    dev_x, dev_w, dev_b = h.up(x), h.up(w), None if b is None else h.up(b)
    want = h.oracle.layer_norm(x64, w64, b64, 1e-5)
    got = h.backend.layer_norm(dev_x, dev_w, dev_b, 1e-5)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.with_out(lambda out: h.backend.layer_norm(dev_x, dev_w, dev_b, 1e-5, out=out), want)


# -------------------------------------------------------------------------------------------
# activations, add, gather
# -------------------------------------------------------------------------------------------

_ACT_SHAPES = [(1, 8), (7, 128), (33, 1536), (5, 11), (64, 256), (2, 4864)]
ACTIVATION: list[Params] = [
    {"tokens": t, "inter": i, "strided": n % 2 == 1} for n, (t, i) in enumerate(_ACT_SHAPES)
]
ACTIVATION += [{"tokens": 4, "inter": 64, "inject": "nan"}]


@op_check("silu_and_mul", "elementwise", ACTIVATION)
def _silu_and_mul(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["tokens"], 2 * p["inter"]), 2.0)
    h.inject(x, x64, kind=p.get("inject"))
    dev_x = h.strided(x) if p.get("strided") else h.up(x)
    want = h.oracle.silu_and_mul(x64)
    got = h.backend.silu_and_mul(dev_x)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.unchanged("input x", dev_x, x)
    h.with_out(lambda out: h.backend.silu_and_mul(dev_x, out=out), want)


GELU_AND_MUL: list[Params] = [
    {**p, "approximate": "tanh" if n % 2 else "none"} for n, p in enumerate(ACTIVATION)
]


@op_check("gelu_and_mul", "elementwise", GELU_AND_MUL)
def _gelu_and_mul(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["tokens"], 2 * p["inter"]), 2.0)
    h.inject(x, x64, kind=p.get("inject"))
    dev_x = h.strided(x) if p.get("strided") else h.up(x)
    approx = p["approximate"]
    want = h.oracle.gelu_and_mul(x64, approx)
    got = h.backend.gelu_and_mul(dev_x, approx)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.with_out(lambda out: h.backend.gelu_and_mul(dev_x, approx, out=out), want)


GELU: list[Params] = [
    {"tokens": t, "width": i, "approximate": "tanh" if n % 2 else "none"}
    for n, (t, i) in enumerate(_ACT_SHAPES)
]
GELU += [{"tokens": 3, "width": 40, "approximate": "none", "inject": "nan"}]


@op_check("gelu", "elementwise", GELU)
def _gelu(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["tokens"], p["width"]), 2.0)
    h.inject(x, x64, kind=p.get("inject"))
    dev_x = h.up(x)
    want = h.oracle.gelu(x64, p["approximate"])
    got = h.backend.gelu(dev_x, p["approximate"])
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.with_out(lambda out: h.backend.gelu(dev_x, p["approximate"], out=out), want)


ADD: list[Params] = [
    {"tokens": t, "width": w, "strided": n % 2 == 1}
    for n, (t, w) in enumerate([(1, 8), (7, 64), (33, 576), (5, 13), (128, 96)])
]
ADD += [{"tokens": 4, "width": 32, "inject": "inf"}, {"tokens": 4, "width": 32, "inject": "nan"}]


@op_check("add", "elementwise", ADD)
def _add(h: Harness, p: Params) -> None:
    a, a64 = h.randn((p["tokens"], p["width"]))
    b, b64 = h.randn((p["tokens"], p["width"]))
    h.inject(a, a64, kind=p.get("inject"))
    dev_a = h.strided(a) if p.get("strided") else h.up(a)
    dev_b = h.strided(b) if p.get("strided") else h.up(b)
    want = h.oracle.add(a64, b64)
    got = h.backend.add(dev_a, dev_b)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.unchanged("input a", dev_a, a)
    h.with_out(lambda out: h.backend.add(dev_a, dev_b, out=out), want)


# Gemma's embedding scale sqrt(H): 48 (H = 2304) is exact in every dtype; sqrt(640), sqrt(2560)
# round to bf16 0.19% low (0.49 u), which the rounding-bias check sees in a backend that
# forgets to round the factor first.
SCALE: list[Params] = [
    {"tokens": 1, "hidden": 8, "factor": 48.0},
    {"tokens": 7, "hidden": 640, "factor": math.sqrt(640), "strided": True},
    {"tokens": 33, "hidden": 2560, "factor": math.sqrt(2560)},
    {"tokens": 5, "hidden": 13, "factor": math.sqrt(1152), "strided": True},
    {"tokens": 64, "hidden": 96, "factor": 0.1},
    {"tokens": 4, "hidden": 32, "factor": math.sqrt(3584), "inject": "nan"},
    {"tokens": 4, "hidden": 32, "factor": 48.0, "inject": "inf"},
]


@op_check("scale", "elementwise", SCALE)
def _scale(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["tokens"], p["hidden"]))
    h.inject(x, x64, kind=p.get("inject"))
    dev_x = h.strided(x) if p.get("strided") else h.up(x)
    factor = p["factor"]
    want = h.oracle.scale(x64, dtype_rounded(factor, h.torch_dtype))
    got = h.backend.scale(dev_x, factor)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.unchanged("input x", dev_x, x)
    h.with_out(lambda out: h.backend.scale(dev_x, factor, out=out), want)


# Gemma 2's final-logit soft cap (30): logits near 1, around the cap (the knee of tanh), far
# past it (saturation at +-cap, inf included), a small cap; and caps <= 0, which are refused.
SOFT_CAP: list[Params] = [
    {"rows": 1, "vocab": 8, "cap": 30.0},
    {"rows": 3, "vocab": 1001, "cap": 30.0, "strided": True},
    {"rows": 2, "vocab": 32000, "cap": 30.0, "scale": 10.0},
    {"rows": 5, "vocab": 257, "cap": 50.0, "scale": 50.0, "strided": True},
    {"rows": 4, "vocab": 300, "cap": 30.0, "scale": 1e3},
    {"rows": 2, "vocab": 96, "cap": 0.5, "scale": 3.0},
    {"rows": 4, "vocab": 64, "cap": 30.0, "scale": 10.0, "inject": "inf"},
    {"rows": 4, "vocab": 64, "cap": 30.0, "inject": "nan"},
    {"rows": 1, "vocab": 16, "cap": 30.0, "bad_caps": True},
]


@op_check("soft_cap", "elementwise", SOFT_CAP)
def _soft_cap(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["rows"], p["vocab"]), p.get("scale", 1.0))
    h.inject(x, x64, kind=p.get("inject"))
    dev_x = h.strided(x) if p.get("strided") else h.up(x)
    cap = p["cap"]
    want = h.oracle.soft_cap(x64, cap)
    got = h.backend.soft_cap(dev_x, cap)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.unchanged("input x", dev_x, x)
    h.with_out(lambda out: h.backend.soft_cap(dev_x, cap, out=out), want)
    if p.get("bad_caps"):
        for bad in (0.0, -cap):
            try:
                h.backend.soft_cap(dev_x, bad)
                refused = False
            except ValueError:
                refused = True
            detail = "" if refused else "returned a result; a cap <= 0 raises ValueError"
            h.add(Check(f"cap {bad:g} refused", refused, detail))


GATHER_ROWS: list[Params] = [
    {"tokens": 1, "hidden": 8, "rows": 1},
    {"tokens": 7, "hidden": 64, "rows": 3},
    {"tokens": 33, "hidden": 576, "rows": 33},
    {"tokens": 100, "hidden": 96, "rows": 12, "strided": True},
    {"tokens": 16, "hidden": 64, "rows": 40},
    {"tokens": 9, "hidden": 32, "rows": 4, "inject": "nan"},
]


@op_check("gather_rows", "exact", GATHER_ROWS)
def _gather_rows(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["tokens"], p["hidden"]))
    h.inject(x, x64, kind=p.get("inject"))
    idx = h.randint(0, p["tokens"], (p["rows"],))
    if p["rows"] > 1:  # the first and the last row
        idx[0], idx[-1] = 0, p["tokens"] - 1
    dev_x = h.strided(x) if p.get("strided") else h.up(x)
    dev_idx = h.up(idx)
    want = h.oracle.gather_rows(x64, idx)
    got = h.backend.gather_rows(dev_x, dev_idx)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.with_out(lambda out: h.backend.gather_rows(dev_x, dev_idx, out=out), want)


# -------------------------------------------------------------------------------------------
# collectives, in a single process (the identity)
# -------------------------------------------------------------------------------------------

COLLECTIVE: list[Params] = [{"tokens": 1, "width": 8}, {"tokens": 7, "width": 576}]


@op_check("all_reduce", "exact", COLLECTIVE)
def _all_reduce(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["tokens"], p["width"]))
    dev_x = h.up(x)
    h.close("output", h.backend.all_reduce(dev_x), x64)
    h.close("in place", dev_x, x64)


@op_check("all_gather", "exact", COLLECTIVE)
def _all_gather(h: Harness, p: Params) -> None:
    x, x64 = h.randn((p["tokens"], p["width"]))
    h.close("output", h.backend.all_gather(h.up(x)), x64)
