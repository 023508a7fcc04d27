"""The CUDA C kernels of the CUDA backend compile with NVRTC for real targets, with no GPU.

CuPy compiles the same source with the same options at run time; here the binding in
``llm_core_cuda.nvrtc`` compiles it for an explicit architecture, since CuPy asks the (absent)
driver for one. Also the host-side choice of copy word the launcher makes.
"""

from __future__ import annotations

import pytest
from llm_core_cuda.cuda_sources import (
    NVRTC_OPTIONS,
    RESHAPE_AND_CACHE_KERNELS,
    RESHAPE_AND_CACHE_SOURCE,
)
from llm_core_cuda.cupy_kernels import word_size
from llm_core_cuda.nvrtc import NvrtcError, compile_to_ptx, load_nvrtc


@pytest.fixture(scope="module")
def nvrtc() -> None:
    try:
        load_nvrtc()
    except NvrtcError as exc:
        pytest.skip(f'NVRTC is not installed ({exc}); pip install "cuda-toolkit[nvrtc]==13.*"')


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_reshape_and_cache_compiles(nvrtc, arch):
    ptx = compile_to_ptx(RESHAPE_AND_CACHE_SOURCE, arch, NVRTC_OPTIONS, "reshape_and_cache.cu")
    assert f".target sm_{arch.split('_')[1]}" in ptx
    for name in RESHAPE_AND_CACHE_KERNELS.values():
        assert f".entry {name}(" in ptx
    # The 16-byte kernel really moves 16-byte words (vectorized loads and stores).
    assert "ld.global.nc.v4.u32" in ptx or "ld.global.v4.u32" in ptx


def test_compile_errors_carry_the_log(nvrtc):
    with pytest.raises(NvrtcError, match="undefined_thing"):
        compile_to_ptx('extern "C" __global__ void f() { undefined_thing(); }', "compute_90")


@pytest.mark.parametrize(
    ("row_bytes", "others", "word"),
    [
        (256, (512, 1024, 0), 16),  # bf16 rows of 128, 16-byte aligned
        (160, (480, 4096), 16),
        (24, (48, 8), 4),  # 6 floats: 4-byte words
        (12, (36, 4), 4),
        (6, (18, 2), 2),  # 3 halves
        (6, (18, 3), None),  # an odd address: no word fits
    ],
)
def test_word_size(row_bytes, others, word):
    assert word_size(row_bytes, *others) == word
