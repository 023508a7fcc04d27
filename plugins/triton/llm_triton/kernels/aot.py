"""Ahead-of-time compilation of every kernel for a GPU target, with no GPU present.

``python -m llm_triton.kernels.aot --target cuda:90 --target hip:gfx942`` compiles
each kernel in the variants the backends launch (dtypes, GQA, odd head sizes, fp8 caches,
the split and direct decode paths) down to a cubin / hsaco and prints one JSON line per
kernel and target. CI runs it for sm_90, gfx942 and gfx90a: it proves the kernels use nothing
a target lacks (a CUDA-only intrinsic fails the HIP compile). Run it without
``TRITON_INTERPRET``: the interpreter replaces the kernels with Python.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from triton.backends.compiler import GPUTarget


@dataclass(frozen=True)
class Variant:
    """One specialization of one kernel: argument types and compile-time constants."""

    name: str
    kernel: Any  # a triton.JITFunction
    types: dict[str, str]  # argument -> Triton type ("*bf16", "i32", "fp32", ...)
    constants: dict[str, Any]
    options: dict[str, int] = field(default_factory=dict)


def _fp8(target: GPUTarget) -> str | None:
    """Triton's name for the target's fp8 KV-cache type, None if the backends use none."""
    if target.backend == "cuda":
        return "fp8e4nv" if int(target.arch) >= 89 else None
    arch = str(target.arch)
    if arch in ("gfx940", "gfx941", "gfx942"):
        return "fp8e4b8"  # FNUZ
    return "fp8e4nv" if arch.startswith(("gfx950", "gfx12")) else None


def variants(target: GPUTarget) -> Iterator[Variant]:
    from llm_triton.kernels import (
        activation,
        attention_decode,
        attention_prefill,
        kv_cache,
        norm,
        rotary,
        sampling,
    )

    ew = {"num_warps": 4}
    attn = {"num_warps": 4, "num_stages": 2 if target.backend == "cuda" else 1}
    for dt in ("fp32", "bf16", "fp16"):
        for residual in (True, False):
            yield Variant(
                f"rms_norm[{dt},residual={residual}]",
                norm.rms_norm_kernel,
                {
                    "x_ptr": f"*{dt}",
                    "res_ptr": f"*{dt}",
                    "w_ptr": f"*{dt}",
                    "y_ptr": f"*{dt}",
                    "stride_x": "i32",
                    "stride_r": "i32",
                    "stride_y": "i32",
                    "n_cols": "i32",
                    "eps": "fp32",
                },
                {"HAS_RESIDUAL": residual, "BLOCK": 4096},
                ew,
            )
        for neox in (True, False):
            yield Variant(
                f"rotary[{dt},neox={neox}]",
                rotary.rotary_kernel,
                {
                    "pos_ptr": "*i64",
                    "q_ptr": f"*{dt}",
                    "k_ptr": f"*{dt}",
                    "cs_ptr": "*fp32",
                    "stride_qt": "i32",
                    "stride_kt": "i32",
                    "stride_cs": "i32",
                    "num_q_heads": "i32",
                    "num_kv_heads": "i32",
                    "head_size": "i32",
                    "half_rot": "i32",
                },
                {"IS_NEOX": neox, "BLOCK_H": 32, "BLOCK_R": 64},
                ew,
            )
        for act in (activation.SILU, activation.GELU, activation.GELU_TANH):
            yield Variant(
                f"act_and_mul[{dt},activation={act}]",
                activation.act_and_mul_kernel,
                {
                    "x_ptr": f"*{dt}",
                    "y_ptr": f"*{dt}",
                    "stride_x": "i32",
                    "stride_y": "i32",
                    "n_cols": "i32",
                },
                {"ACTIVATION": act, "BLOCK": 1024},
                ew,
            )
    caches = [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")]
    fp8 = _fp8(target)
    if fp8:
        caches.append(("bf16", fp8))
    for act_dt, cache_dt in caches:
        yield Variant(
            f"reshape_and_cache[{act_dt}->{cache_dt}]",
            kv_cache.reshape_and_cache_kernel,
            {
                "k_ptr": f"*{act_dt}",
                "v_ptr": f"*{act_dt}",
                "kc_ptr": f"*{cache_dt}",
                "vc_ptr": f"*{cache_dt}",
                "slot_ptr": "*i64",
                "stride_kt": "i32",
                "stride_vt": "i32",
                "row_size": "i32",
            },
            {"BLOCK": 1024},
            ew,
        )
        for head_size, group in (
            ((128, 4), (80, 1), (256, 8)) if cache_dt == act_dt else ((128, 4),)
        ):
            block_d = max(16, 1 << (head_size - 1).bit_length())
            common = {
                "q_ptr": f"*{act_dt}",
                "k_cache": f"*{cache_dt}",
                "v_cache": f"*{cache_dt}",
                "block_tables": "*i32",
                "seq_lens": "*i32",
                "out_ptr": f"*{act_dt}",
                "scale": "fp32",
                "soft_cap": "fp32",
                "window": "i32",
                "stride_qt": "i32",
                "stride_ot": "i32",
                "stride_cb": "i32",
                "stride_cs": "i32",
                "stride_ch": "i32",
                "stride_bt": "i32",
                "block_size": "i32",
                "head_size": "i32",
            }
            fp32_dot = act_dt == "fp32"
            for direct in (True, False):
                yield Variant(
                    f"decode[{act_dt}/{cache_dt},D={head_size},G={group},direct={direct}]",
                    attention_decode.decode_split_kernel,
                    {
                        **common,
                        "part_out": "*fp32",
                        "part_lse": "*fp32",
                        "num_q_heads": "i32",
                        "split_len": "i32",
                        "num_splits": "i32",
                    },
                    {
                        "GROUP": group,
                        "BLOCK_G": max(16, group),
                        "BLOCK_N": 64,
                        "BLOCK_D": block_d,
                        "DIRECT": direct,
                        "USE_SOFT_CAP": not direct,
                        "USE_WINDOW": not direct,
                        "FP32_DOT": fp32_dot,
                    },
                    attn,
                )
            yield Variant(
                f"prefill[{act_dt}/{cache_dt},D={head_size},G={group}]",
                attention_prefill.prefill_kernel,
                {**common, "query_start_loc": "*i32"},
                {
                    "GROUP": group,
                    "BLOCK_M": 64,
                    "BLOCK_N": 64 if head_size <= 128 else 32,
                    "BLOCK_D": block_d,
                    "USE_SOFT_CAP": head_size == 256,
                    "USE_WINDOW": True,
                    "FP32_DOT": fp32_dot,
                },
                attn,
            )
    yield Variant(
        "decode_reduce",
        attention_decode.decode_reduce_kernel,
        {
            "part_out": "*fp32",
            "part_lse": "*fp32",
            "out_ptr": "*bf16",
            "stride_ot": "i32",
            "num_q_heads": "i32",
            "head_size": "i32",
            "num_splits": "i32",
        },
        {"BLOCK_S": 32, "BLOCK_D": 128},
        ew,
    )
    yield Variant(
        "exponential_race",
        sampling.exponential_race_kernel,
        {
            "probs_ptr": "*fp32",
            "seeds_ptr": "*i64",
            "out_ptr": "*i64",
            "n_rows": "i32",
            "vocab": "i32",
            "stride_p": "i32",
        },
        {"BLOCK_B": 4, "BLOCK_V": 1024},
        ew,
    )


#: A representative variant of every kernel: what CI compiles for each target (the full set
#: takes minutes; fp32 attention alone takes a minute on sm_90, its dot being plain FMAs).
QUICK: tuple[str, ...] = (
    "rms_norm[bf16,residual=True]",
    "rms_norm[fp16,residual=False]",
    "rotary[bf16,neox=True]",
    "rotary[fp16,neox=False]",
    "act_and_mul[bf16,activation=0]",
    "act_and_mul[bf16,activation=2]",
    "reshape_and_cache[bf16->bf16]",
    "reshape_and_cache[bf16->fp8e4nv]",
    "reshape_and_cache[bf16->fp8e4b8]",
    "decode[bf16/bf16,D=128,G=4,direct=False]",
    "decode[fp16/fp16,D=80,G=1,direct=True]",
    "decode[bf16/fp8e4nv,D=128,G=4,direct=True]",
    "decode[bf16/fp8e4b8,D=128,G=4,direct=True]",
    "prefill[bf16/bf16,D=128,G=4]",
    "decode_reduce",
    "exponential_race",
)


def selected(name: str, only: list[str]) -> bool:
    return not only or name in only


def compile_variant(variant: Variant, target: GPUTarget) -> dict[str, Any]:
    """Compile one variant; returns a JSON-ready record (never raises for a compile error)."""
    import triton
    from triton.compiler import ASTSource

    fn = variant.kernel
    signature = {}
    for arg in fn.arg_names:
        if arg in variant.constants:
            signature[arg] = "constexpr"
        elif arg in variant.types:
            signature[arg] = variant.types[arg]
        else:
            return _record(variant, target, ok=False, error=f"no type given for argument {arg}")
    started = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(variant.constants))
        compiled = triton.compile(src, target=target, options=dict(variant.options))
    except Exception as exc:
        return _record(variant, target, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    binary = "cubin" if target.backend == "cuda" else "hsaco"
    asm = compiled.asm
    text = asm.get("ptx") if target.backend == "cuda" else asm.get("amdgcn")
    return _record(
        variant,
        target,
        ok=True,
        binary_bytes=len(asm.get(binary) or b""),
        target_line=_target_line(text or "", target),
        shared_bytes=int(getattr(compiled.metadata, "shared", 0)),
        seconds=round(time.perf_counter() - started, 3),
    )


def _target_line(text: str, target: GPUTarget) -> str:
    key = ".target" if target.backend == "cuda" else ".amdgcn_target"
    return next((ln.strip() for ln in text.splitlines() if key in ln), "")


def _record(variant: Variant, target: GPUTarget, **fields: Any) -> dict[str, Any]:
    return {"kernel": variant.name, "target": f"{target.backend}:{target.arch}", **fields}


def parse_target(text: str) -> GPUTarget:
    """``cuda:90`` -> ``GPUTarget("cuda", 90, 32)``; ``hip:gfx942`` -> the gfx942 target
    with wavefront 64."""
    backend, _, arch = text.partition(":")
    if backend == "cuda" and arch.isdigit():
        return GPUTarget("cuda", int(arch), 32)
    if backend == "hip" and arch.startswith("gfx"):
        return GPUTarget("hip", arch, 64)
    raise ValueError(f"unknown target {text!r}: use cuda:<sm, e.g. 90> or hip:<gfx, e.g. gfx942>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True, help="cuda:90, hip:gfx942")
    parser.add_argument("--only", action="append", default=[], help="a variant name (repeatable)")
    parser.add_argument("--quick", action="store_true", help="only the QUICK variants")
    args = parser.parse_args(argv)
    only = list(args.only) + (list(QUICK) if args.quick else [])
    failed = 0
    for text in args.target:
        target = parse_target(text)
        for variant in variants(target):
            if not selected(variant.name, only):
                continue
            record = compile_variant(variant, target)
            failed += not record["ok"]
            print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
