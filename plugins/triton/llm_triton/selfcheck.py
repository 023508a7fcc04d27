"""Numerical self-check of a GPU backend against the reference, and the test-case builders
the project's tests share.

``python -m llm_triton.selfcheck --backend cuda`` (or ``rocm``) runs every operator the
backend implements natively on small seeded inputs, the CuPy KV-cache kernel, and a CUDA-graph
replay, against the reference run in float64 on the CPU; it prints one JSON line per check
and exits non-zero on any failure. It is a quick smoke test for a GPU machine: certification
is ``llm-core conformance --backend cuda``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from llm_hal import AttentionMetadata, Backend, DType, TorchBackend
from llm_hal.tolerances import tolerance

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass
class Comparison:
    ok: bool
    max_abs: float
    nmse: float
    detail: str = ""


def compare(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, op_class: str, slack: float = 1.0
) -> Comparison:
    """Pass if NaN/Inf match, ``|x-g| <= atol + rtol*|g|`` everywhere and NMSE is capped, with
    the bounds of ``op_class`` for ``dtype`` in the HAL's tolerance table
    (:func:`llm_hal.tolerances.tolerance`, the conformance suite's table). ``slack`` widens the
    bounds (NMSE by its square) for a declared waiver."""
    x = out.detach().to("cpu", torch.float64)
    g = ref.detach().to("cpu", torch.float64)
    if x.shape != g.shape:
        return Comparison(False, math.inf, math.inf, f"shape {tuple(x.shape)} != {tuple(g.shape)}")
    if not torch.equal(torch.isnan(x), torch.isnan(g)) or not torch.equal(
        torch.isinf(x), torch.isinf(g)
    ):
        return Comparison(False, math.inf, math.inf, "NaN/Inf mismatch")
    finite = torch.isfinite(g)
    x, g = x[finite], g[finite]
    tol = tolerance(op_class, DType.parse(dtype))  # the NMSE cap comes floored at u^2
    rtol, atol, cap = tol.rtol * slack, tol.atol * slack, tol.nmse * slack**2
    diff = (x - g).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    nmse = float((diff**2).sum() / (g**2).sum().clamp_min(1e-300)) if diff.numel() else 0.0
    within = bool(torch.all(diff <= atol + rtol * g.abs()))
    capped = nmse <= cap
    detail = "" if within else f"worst excess {float((diff - atol - rtol * g.abs()).max()):.3g}"
    return Comparison(within and capped, max_abs, nmse, detail)


def attention_case(
    q_lens: Sequence[int],
    seq_lens: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    num_blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Seeded CPU inputs of a paged-attention step: query (T, Hq*D) as a strided view of a
    fused qkv, caches (NB, BS, Hkv, D) filled with random values, and metadata whose block
    tables are a random permutation (blocks of one sequence are scattered)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    per_seq = [-(-s // block_size) for s in seq_lens]
    needed = sum(per_seq)
    nb = num_blocks or needed + 3
    perm = rng.permutation(nb)[:needed]
    width = max(per_seq) + 1  # a spare column: entries past a sequence's need are ignored
    tables = np.full((len(seq_lens), width), nb + 7, dtype=np.int64)  # out of range: unused
    offset = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = perm[offset : offset + n]
        offset += n
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    slots = []
    for b, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        pos = np.arange(sl - ql, sl)
        slots.append(tables[b, pos // block_size] * block_size + pos % block_size)
    meta = AttentionMetadata(
        query_start_loc=starts,
        seq_lens=np.asarray(seq_lens),
        block_tables=tables,
        slot_mapping=np.concatenate(slots) if slots else np.zeros(0),
        block_size=block_size,
    )
    shape = (nb, block_size, num_kv_heads, head_size)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    t = int(starts[-1])
    q_width = num_heads * head_size
    qkv = torch.randn((t, q_width + 2 * num_kv_heads * head_size), generator=gen).to(dtype)
    return qkv[:, :q_width], k_cache, v_cache, meta


@dataclass
class ToyDecoder:
    """A one-layer attention block built only from HAL operators: the decode step the CUDA
    graph tests record. ``step`` embeds, normalizes, projects, rotates, writes the cache,
    attends over it and projects back: (B,) ids -> (B, hidden)."""

    backend: Backend
    weights: dict[str, Any]
    key_cache: Any
    value_cache: Any
    num_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 16

    @classmethod
    def build(
        cls, backend: Backend, num_blocks: int, block_size: int, dtype: torch.dtype, seed: int = 0
    ) -> ToyDecoder:
        gen = torch.Generator().manual_seed(seed)
        hq, hkv, d, hidden, vocab = 4, 2, 16, 64, 50
        host = {
            "embed": torch.randn((vocab, hidden), generator=gen),
            "norm": 1 + 0.1 * torch.randn((hidden,), generator=gen),
            "wqkv": torch.randn(((hq + 2 * hkv) * d, hidden), generator=gen) / 8,
            "wo": torch.randn((hidden, hq * d), generator=gen) / 8,
            "cache": torch.randn((2, num_blocks, block_size, hkv, d), generator=gen),
        }
        hal = DType.parse(dtype)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.arange(256, dtype=torch.float64)[:, None] * inv[None, :]
        weights = {
            "embed": backend.from_host(host["embed"], hal),
            "norm": backend.from_host(host["norm"], hal),
            "wqkv": backend.prepare_linear(backend.from_host(host["wqkv"], hal)),
            "wo": backend.prepare_linear(backend.from_host(host["wo"], hal)),
            "cos_sin": backend.from_host(torch.cat([angles.cos(), angles.sin()], 1), DType.FP32),
        }
        k_cache = backend.from_host(host["cache"][0], hal)
        v_cache = backend.from_host(host["cache"][1], hal)
        return cls(backend, weights, k_cache, v_cache, hq, hkv, d)

    def step(self, ids: Any, positions: Any, meta: AttentionMetadata) -> Any:
        be, w = self.backend, self.weights
        h = be.embedding(ids, w["embed"])  # (B, hidden)
        x, _ = be.rms_norm(h, w["norm"], 1e-6)
        qkv = be.linear(x, w["wqkv"])  # (B, (Hq + 2 Hkv) D)
        kv = self.num_kv_heads * self.head_size
        q, k, v = be.split(qkv, [self.num_heads * self.head_size, kv, kv])
        q, k = be.rotary_embedding(positions, q, k, w["cos_sin"], self.head_size, True)
        be.reshape_and_cache(k, v, self.key_cache, self.value_cache, meta)
        o = be.paged_attention_decode(
            q, self.key_cache, self.value_cache, meta, self.head_size**-0.5
        )
        return be.linear(o, w["wo"])  # (B, hidden)


def decode_step_inputs(
    seq_lens: Sequence[int], block_size: int, max_blocks: int, seed: int
) -> tuple[np.ndarray, np.ndarray, AttentionMetadata]:
    """Host inputs of one decode step: each sequence owns a disjoint, shuffled set of blocks."""
    rng = np.random.default_rng(seed)
    b = len(seq_lens)
    tables = rng.permutation(b * max_blocks).reshape(b, max_blocks)
    lens = np.asarray(seq_lens)
    pos = lens - 1
    slots = tables[np.arange(b), pos // block_size] * block_size + pos % block_size
    meta = AttentionMetadata(np.arange(b + 1), lens, tables, slots, block_size)
    return rng.integers(0, 50, size=b), pos, meta


# ----------------------------------------------------------------------------------------------
# the GPU self-check
# ----------------------------------------------------------------------------------------------


def _checks(backend: Any) -> list[tuple[str, Callable[[], Comparison]]]:
    dev = backend.device
    ref = TorchBackend("cpu")
    checks: list[tuple[str, Callable[[], Comparison]]] = []
    dtypes = [dt for dt in (F32, F16, BF16) if backend.supports("rms_norm", DType.parse(dt))]

    for dt in dtypes:

        def attn(decode: bool, dt: torch.dtype = dt) -> Comparison:
            q_lens = [1, 1, 1] if decode else [5, 1, 40]
            q, kc, vc, meta = attention_case(q_lens, [7, 300, 64], 8, 2, 128, 16, dt, seed=1)
            fn = ref.paged_attention_decode if decode else ref.paged_attention_prefill
            want = fn(q.double(), kc.double(), vc.double(), meta, 0.088)
            op = backend.paged_attention_decode if decode else backend.paged_attention_prefill
            got = op(q.to(dev), kc.to(dev), vc.to(dev), meta, 0.088)
            return compare(got, want, dt, "attention")

        def norm(dt: torch.dtype = dt) -> Comparison:
            x, r, w = (
                torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dt)
                for i, s in enumerate([(7, 4096), (7, 4096), (4096,)])
            )
            want, _ = ref.rms_norm(x.double(), w.double(), 1e-6, r.double())
            got, _ = backend.rms_norm(x.to(dev), w.to(dev), 1e-6, r.to(dev))
            return compare(got, want, dt, "norm")

        def act(dt: torch.dtype = dt) -> Comparison:
            x = torch.randn((9, 2 * 1000), generator=torch.Generator().manual_seed(3)).to(dt)
            return compare(
                backend.silu_and_mul(x.to(dev)), ref.silu_and_mul(x.double()), dt, "elementwise"
            )

        checks += [
            (f"paged_attention_prefill[{dt}]", functools.partial(attn, False)),
            (f"paged_attention_decode[{dt}]", functools.partial(attn, True)),
            (f"rms_norm[{dt}]", norm),
            (f"silu_and_mul[{dt}]", act),
        ]

    def kv_write() -> Comparison:
        _, kc, vc, meta = attention_case([3, 1], [9, 20], 4, 2, 64, 16, BF16, seed=4)
        kv = torch.randn((4, 2 * 2 * 64)).to(BF16)
        k, v = kv[:, :128], kv[:, 128:]
        kc_ref, vc_ref = kc.clone(), vc.clone()
        ref.reshape_and_cache(k, v, kc_ref, vc_ref, meta)
        kc_dev, vc_dev = kc.to(dev), vc.to(dev)
        backend.reshape_and_cache(k.to(dev), v.to(dev), kc_dev, vc_dev, meta)
        same = torch.equal(kc_dev.cpu(), kc_ref) and torch.equal(vc_dev.cpu(), vc_ref)
        return Comparison(same, 0.0 if same else math.inf, 0.0, "" if same else "not exact")

    def graph() -> Comparison:
        block_size, max_blocks, batch = 16, 8, 4
        num_blocks = batch * max_blocks
        toy = ToyDecoder.build(backend, num_blocks, block_size, F32, seed=5)
        eager = ToyDecoder.build(ref, num_blocks, block_size, torch.float64, seed=5)
        recorded = backend.capture_decode(toy.step, batch, max_blocks, block_size)
        if recorded is None:
            return Comparison(False, math.inf, math.inf, "CUDA graphs are turned off")
        worst = Comparison(True, 0.0, 0.0)
        for seed, lens in enumerate(([37, 5, 128], [1, 99, 64, 2])):
            ids, pos, meta = decode_step_inputs(lens, block_size, max_blocks, seed)
            got = recorded.replay(ids, pos, meta)
            want = eager.step(torch.from_numpy(ids), torch.from_numpy(pos), meta)
            result = compare(got, want, F32, "attention")
            if not result.ok or result.max_abs > worst.max_abs:
                worst = result
        return worst

    def step_graph() -> Comparison:
        """The HAL hook the engine uses: inputs updated in place between replays."""
        block_size, max_blocks = 16, 8
        toy = ToyDecoder.build(backend, 3 * max_blocks, block_size, F32, seed=6)
        eager = ToyDecoder.build(ref, 3 * max_blocks, block_size, torch.float64, seed=6)
        ids, pos, meta = decode_step_inputs([37, 5, 128], block_size, max_blocks, 0)
        ids_dev, pos_dev = torch.from_numpy(ids).to(dev), torch.from_numpy(pos).to(dev)
        out: dict[str, torch.Tensor] = {}

        def step() -> None:
            out["y"] = toy.step(ids_dev, pos_dev, meta)

        recorded = backend.capture_graph(step)
        if recorded is None:
            return Comparison(False, math.inf, math.inf, "the step was not captured (see log)")
        want = eager.step(torch.from_numpy(ids), torch.from_numpy(pos), meta)
        worst = compare(out["y"], want, F32, "attention")  # the recorded call's own result
        for seed, lens in enumerate(([1, 99, 64], [128, 2, 17]), start=1):
            new_ids, new_pos, new = decode_step_inputs(lens, block_size, max_blocks, seed)
            ids_dev.copy_(torch.from_numpy(new_ids))
            pos_dev.copy_(torch.from_numpy(new_pos))
            for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
                getattr(meta, name)[...] = getattr(new, name)
            meta.device_cache.clear()
            recorded.replay()
            want = eager.step(torch.from_numpy(new_ids), torch.from_numpy(new_pos), new)
            result = compare(out["y"], want, F32, "attention")
            if not result.ok or result.max_abs > worst.max_abs:
                worst = result
        return worst

    checks.append(("reshape_and_cache[bf16]", kv_write))
    checks.append(("decode_graph[fp32]", graph))
    checks.append(("capture_graph[fp32]", step_graph))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=["cuda", "rocm"])
    args = parser.parse_args(argv)
    from llm_hal import BackendUnavailableError, get_registry

    # Through the registry, as the engine finds it: the installed plugin's probe and factory.
    try:
        backend = get_registry().create(args.backend)
    except BackendUnavailableError as exc:
        print(json.dumps({"check": "probe", "ok": False, "detail": str(exc)}))
        return 1
    failed = 0
    for name, check in _checks(backend):
        try:
            result = check()
            record = {
                "check": name,
                "ok": result.ok,
                "max_abs": result.max_abs,
                "nmse": result.nmse,
                "detail": result.detail,
            }
        except Exception as exc:
            record = {"check": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        failed += not record["ok"]
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
