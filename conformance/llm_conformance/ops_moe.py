"""Checks of the mixture-of-experts operators: routing and the gated experts."""

from __future__ import annotations

import math

import torch
from llm_hal import DType

from llm_conformance.cases import Params, op_check
from llm_conformance.harness import F64, Harness

MOE_ROUTE: list[Params] = [
    {"tokens": 1, "experts": 8, "top_k": 2, "renormalize": True},
    {"tokens": 7, "experts": 8, "top_k": 2, "renormalize": False},
    {"tokens": 33, "experts": 64, "top_k": 6, "renormalize": True},
    {"tokens": 5, "experts": 128, "top_k": 8, "renormalize": False},
    {"tokens": 16, "experts": 4, "top_k": 1, "renormalize": True},
]


@op_check("moe_route", "softmax", MOE_ROUTE)
def _moe_route(h: Harness, p: Params) -> None:
    t, e = p["tokens"], p["experts"]
    # Distinct values on a 1/64 grid (exact in every dtype): the top-k set is unambiguous.
    grid = torch.stack([h.randperm(512)[:e] for _ in range(t)]) - 256
    logits = (grid / 64).to(h.torch_dtype)
    want_w, want_ids = h.oracle.moe_route(logits.to(F64), p["top_k"], p["renormalize"])
    got_w, got_ids = h.backend.moe_route(h.up(logits), p["top_k"], p["renormalize"])
    h.same("expert ids", got_ids, want_ids)
    h.close("weights", got_w, want_w, dtype=DType.FP32)


MOE_EXPERTS: list[Params] = [
    {"tokens": 1, "hidden": 64, "inter": 32, "experts": 4, "top_k": 2, "activation": "silu"},
    {"tokens": 7, "hidden": 128, "inter": 64, "experts": 8, "top_k": 2, "activation": "silu"},
    {"tokens": 33, "hidden": 96, "inter": 48, "experts": 16, "top_k": 4, "activation": "gelu"},
    {"tokens": 16, "hidden": 64, "inter": 128, "experts": 3, "top_k": 3, "activation": "silu"},
]


@op_check("moe_experts", "linear", MOE_EXPERTS)
def _moe_experts(h: Harness, p: Params) -> None:
    t, hid, inter, e, k = p["tokens"], p["hidden"], p["inter"], p["experts"], p["top_k"]
    x, x64 = h.randn((t, hid))
    w13, w13_64 = h.randn((e, 2 * inter, hid), 1 / math.sqrt(hid))
    w2, w2_64 = h.randn((e, hid, inter), 1 / math.sqrt(inter))
    ids = torch.stack([h.randperm(e)[:k] for _ in range(t)])
    weights = torch.rand((t, k), generator=h.gen, dtype=torch.float32)
    want = h.oracle.moe_experts(x64, w13_64, w2_64, weights.to(F64), ids, p["activation"])
    dx, d13, d2, dw, dids = (h.up(a) for a in (x, w13, w2, weights, ids))
    act = p["activation"]
    got = h.backend.moe_experts(dx, d13, d2, dw, dids, act)
    h.expect_dtype("output", got, h.dtype)
    h.close("output", got, want)
    h.with_out(lambda out: h.backend.moe_experts(dx, d13, d2, dw, dids, act, out=out), want)
