"""The CUDA backend on a real NVIDIA GPU: the self-check (every native operator against the
reference, the CuPy KV-cache kernel, a CUDA-graph replay) in a child process, where Triton
compiles for the device instead of interpreting. Skipped, with the reason, without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="no CUDA device"
)


def test_selfcheck_on_cuda_device():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "llm_triton.selfcheck", "--backend", "cuda"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
