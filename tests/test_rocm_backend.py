"""The ROCm backend without AMD hardware: the fp8 format per architecture, the wavefront-64
launch parameters run through the shared Triton kernels (in the interpreter), and the GPU
self-check when a ROCm device is present. Selection (ROCm build -> rocm, never cuda) is in
test_cuda_platform.py; the gfx942/gfx90a compiles are in test_triton_aot.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import pytest
import torch
from llm_core_rocm.arch import base_arch, fp8_dtype, has_native_fp8
from llm_hal import DType, TorchBackend


@pytest.mark.parametrize(
    ("arch", "dtype", "native"),
    [
        ("gfx942:sramecc+:xnack-", DType.FP8_E4M3FNUZ, True),  # MI300X
        ("gfx940", DType.FP8_E4M3FNUZ, True),
        ("gfx941", DType.FP8_E4M3FNUZ, True),
        ("gfx950", DType.FP8_E4M3FN, True),  # MI350: OCP fp8
        ("gfx90a:sramecc+:xnack-", DType.FP8_E4M3FN, False),  # MI200: storage only
        ("gfx1201", DType.FP8_E4M3FN, True),  # RDNA4
        ("gfx1100", DType.FP8_E4M3FN, False),
    ],
)
def test_fp8_dtype_per_architecture(arch, dtype, native):
    assert fp8_dtype(arch) is dtype
    assert has_native_fp8(arch) is native


def test_base_arch():
    assert base_arch(" GFX942:sramecc+:xnack- ") == "gfx942"
    # The HAL's fp8 types map to torch's: FNUZ is a distinct format (bias 8, no -0).
    assert torch.finfo(torch.float8_e4m3fnuz).max == 240.0
    assert torch.finfo(torch.float8_e4m3fn).max == 448.0


def test_rocm_launch_parameters_run_the_shared_kernels():
    """ROCM_CONFIG's tile sizes (32-key tiles, one pipeline stage, 304 CUs) drive the same
    kernels to the reference's results."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from llm_triton.backend import TritonBackend
    from llm_triton.kernels import ROCM_CONFIG
    from llm_triton.kernels.config import require_interpreter
    from llm_triton.selfcheck import attention_case, compare

    require_interpreter()
    assert ROCM_CONFIG.warp_size == 64
    backend, ref = TritonBackend("cpu", ROCM_CONFIG), TorchBackend("cpu")
    q, kc, vc, meta = attention_case([9, 1, 40], [9, 20, 70], 8, 2, 64, 16, torch.float32, 3)
    want = ref.paged_attention_prefill(q.double(), kc.double(), vc.double(), meta, 0.125)
    got = backend.paged_attention_prefill(q, kc, vc, meta, 0.125)
    assert compare(got, want, torch.float32, "attention").ok
    q, kc, vc, meta = attention_case([1, 1], [300, 33], 8, 2, 64, 16, torch.float32, 4)
    want = ref.paged_attention_decode(q.double(), kc.double(), vc.double(), meta, 0.125)
    got = backend.paged_attention_decode(q, kc, vc, meta, 0.125)
    assert compare(got, want, torch.float32, "attention").ok


@pytest.mark.skipif(
    torch.version.hip is None or not torch.cuda.is_available(),
    reason="no ROCm device (needs a ROCm build of torch and an AMD GPU)",
)
def test_selfcheck_on_rocm_device():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "llm_triton.selfcheck", "--backend", "rocm"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
