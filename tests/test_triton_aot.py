"""Every Triton kernel compiles ahead of time for NVIDIA sm_90 and AMD gfx942 / gfx90a, with
no GPU: ``triton.compile`` down to a cubin / hsaco for each target (a CUDA-only intrinsic, or
a tile that does not fit a wavefront-64 target, fails here).

The compiles run in child processes (``python -m llm_triton.kernels.aot``): this
test process runs Triton in interpreter mode, where kernels cannot be compiled. They reuse
Triton's on-disk cache, so only a changed kernel is compiled again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # the same process-wide mode as the interpreter tests

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

QUICK_COMMON = [
    "rms_norm[bf16,residual=True]",
    "rms_norm[fp16,residual=False]",
    "rotary[bf16,neox=True]",
    "rotary[fp16,neox=False]",
    "act_and_mul[bf16,activation=0]",
    "act_and_mul[bf16,activation=2]",
    "reshape_and_cache[bf16->bf16]",
    "decode[bf16/bf16,D=128,G=4,direct=False]",
    "decode[fp16/fp16,D=80,G=1,direct=True]",
    "prefill[bf16/bf16,D=128,G=4]",
    "decode_reduce",
    "exponential_race",
]
#: target -> (extra aot arguments, the variants expected, the arch string in the assembly)
TARGETS = {
    "cuda:90": (
        ["--quick"],
        [
            *QUICK_COMMON,
            "reshape_and_cache[bf16->fp8e4nv]",
            "decode[bf16/fp8e4nv,D=128,G=4,direct=True]",
        ],
        "sm_90",
    ),
    "hip:gfx942": (
        ["--quick"],
        [
            *QUICK_COMMON,
            "reshape_and_cache[bf16->fp8e4b8]",
            "decode[bf16/fp8e4b8,D=128,G=4,direct=True]",
        ],
        "gfx942",
    ),
    # gfx90a (MI200, no fp8): the attention kernels, whose MFMA lowering differs from gfx942.
    "hip:gfx90a": (
        [
            "--only",
            "decode[bf16/bf16,D=128,G=4,direct=False]",
            "--only",
            "prefill[bf16/bf16,D=128,G=4]",
            "--only",
            "rms_norm[bf16,residual=True]",
        ],
        [
            "decode[bf16/bf16,D=128,G=4,direct=False]",
            "prefill[bf16/bf16,D=128,G=4]",
            "rms_norm[bf16,residual=True]",
        ],
        "gfx90a",
    ),
}


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, dict]]:
    """Compile every target at once (one child process each, in parallel)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {
        target: subprocess.Popen(
            [sys.executable, "-m", "llm_triton.kernels.aot", "--target", target, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for target, (extra, _, _) in TARGETS.items()
    }
    results: dict[str, dict[str, dict]] = {}
    for target, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if not records:
            pytest.fail(
                f"aot for {target} printed nothing (exit {proc.returncode}):\n{err[-3000:]}"
            )
        results[target] = {r["kernel"]: r for r in records}
    return results


CASES = [(t, name) for t, (_, names, _) in TARGETS.items() for name in names]


@pytest.mark.parametrize(("target", "kernel"), CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_kernel_compiles(compiled, target, kernel):
    record = compiled[target].get(kernel)
    assert record is not None, f"{kernel} was not compiled for {target}"
    assert record["ok"], record.get("error")
    assert record["binary_bytes"] > 0
    assert TARGETS[target][2] in record["target_line"]


def test_parse_target_rejects_unknown_targets():
    from llm_triton.kernels.aot import parse_target

    assert parse_target("hip:gfx942").warp_size == 64
    assert parse_target("cuda:90").arch == 90
    with pytest.raises(ValueError, match="unknown target"):
        parse_target("metal:m3")
