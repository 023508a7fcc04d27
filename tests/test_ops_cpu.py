"""Every operator of the CPU backend against the reference run in float64.

Inputs are seeded random values rounded to the tested dtype (fp32, bf16); the reference gets
the same rounded values upcast to float64. A result passes only if both the elementwise check
``|x - g| <= atol + rtol * |g|`` and the NMSE cap of its operator class hold, after NaN/Inf
parity. Shapes cover one token, block boundaries, GQA ratios 1/3/4, odd head sizes (80, 96),
contexts over many blocks and strided inputs from ``split``.

The bounds are those of the conformance suite's tolerance table (``llm_hal.tolerances``),
applied by :func:`support.numerics.assert_close`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from llm_core_cpu import CpuBackend
from llm_core_cpu.graph import CpuGraph
from llm_hal import AttentionMetadata, PenaltyMetadata, QuantScheme, SamplingMetadata, TorchBackend
from support.numerics import assert_close

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16")]

# -------------------------------------------------------------------------------------------
# inputs
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu() -> CpuBackend:
    return CpuBackend()


@pytest.fixture(scope="module")
def ref() -> TorchBackend:
    return TorchBackend("cpu")


def _rand(
    gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random values in ``dtype`` and the same values in float64 for the reference."""
    x = (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)
    return x, x.double()


def _strided(
    gen: torch.Generator, rows: int, width: int, dtype: torch.dtype, extra: int = 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, width) views out of a wider tensor, as ``split`` of a fused projection gives."""
    full, full64 = _rand(gen, (rows, width + extra), dtype)
    return torch.split(full, [width, extra], -1)[0], torch.split(full64, [width, extra], -1)[0]


def _seeded(*key: object) -> torch.Generator:
    """A generator seeded from the case's parameters: stable across runs and processes."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _guarded_out(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``out`` tensor with a guard row on each side, to catch out-of-bounds writes."""
    big = torch.full((like.shape[0] + 2, *like.shape[1:]), 1234.5, dtype=like.dtype)
    return big, big[1:-1]


def _check_out(
    call: Callable[[torch.Tensor], Any],
    expected: torch.Tensor,
    pick: Callable[[Any], Any] | None = None,
) -> None:
    """Run ``call(out)``: the result must be ``out`` itself, hold ``expected``, and the guard
    rows around it must be untouched."""
    big, out = _guarded_out(expected)
    result = call(out)
    result = pick(result) if pick else result
    assert result.data_ptr() == out.data_ptr() and result.shape == out.shape
    assert torch.equal(out, expected)
    assert bool(torch.all(big[0] == 1234.5)) and bool(torch.all(big[-1] == 1234.5))


# -------------------------------------------------------------------------------------------
# embedding, linear
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("vocab", "tokens", "hidden"), [(1, 1, 8), (7, 5, 80), (50, 33, 96)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_embedding(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, vocab: int, tokens: int, hidden: int,
    id_dtype: torch.dtype,
) -> None:  # fmt: skip
    gen = _seeded("embedding", vocab, tokens, hidden)
    table, table64 = _rand(gen, (vocab, hidden), dtype)
    ids = torch.randint(0, vocab, (tokens,), generator=gen, dtype=id_dtype)
    got = cpu.embedding(ids, table)
    assert got.dtype == dtype
    assert_close(got, ref.embedding(ids, table64), "exact", dtype)
    _check_out(lambda out: cpu.embedding(ids, table, out=out), got)


LINEAR_SHAPES = [  # every small-batch tile, both token panels, the GEMM path, ragged tails
    (1, 16, 8), (2, 72, 40), (3, 128, 256), (4, 100, 24), (5, 64, 96), (6, 48, 17), (7, 24, 9),
    (8, 40, 13), (17, 80, 33), (40, 36, 20), (129, 24, 35),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "k", "n"), LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_linear_dense(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, k: int, n: int,
    bias: bool, strided: bool,
) -> None:  # fmt: skip
    gen = _seeded("linear", tokens, k, n, bias, strided)
    x, x64 = _strided(gen, tokens, k, dtype) if strided else _rand(gen, (tokens, k), dtype)
    w, w64 = _rand(gen, (n, k), dtype, 1 / math.sqrt(k))
    b, b64 = _rand(gen, (n,), dtype) if bias else (None, None)
    weight = cpu.prepare_linear(w, b)
    got = cpu.linear(x, weight)
    assert got.dtype == dtype
    assert_close(got, ref.linear(x64, ref.prepare_linear(w64, b64)), "linear", dtype)
    _check_out(lambda out: cpu.linear(x, weight, out=out), got)


def _quantized(
    scheme: QuantScheme, n: int, k: int, group: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(weight, fp64 scales, fp64 zeros or None) in the documented layout of ``scheme``."""
    groups = k // group if group else 1
    if scheme is QuantScheme.W4A16:
        weight = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
        scales = torch.rand((n, groups), generator=gen, dtype=F64) * 0.1 / math.sqrt(k) + 1e-3
        zeros = torch.randint(0, 16, (n, groups), generator=gen).double()
        return weight, scales, zeros
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    shape = (n, 1) if scheme is QuantScheme.W8A8 else (n, groups)
    scales = torch.rand(shape, generator=gen, dtype=F64) * 0.02 / math.sqrt(k) + 1e-4
    return weight, scales, None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("scheme", "group"),
    [(QuantScheme.W8A16, 32), (QuantScheme.W8A16, 0), (QuantScheme.W4A16, 16),
     (QuantScheme.W4A16, 64), (QuantScheme.W8A8, 0)],
    ids=["w8a16-g32", "w8a16-channel", "w4a16-g16", "w4a16-g64", "w8a8"],
)  # fmt: skip
@pytest.mark.parametrize(("tokens", "k", "n"), [(1, 64, 16), (7, 128, 48)])
def test_linear_quantized(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, scheme: QuantScheme, group: int,
    tokens: int, k: int, n: int,
) -> None:  # fmt: skip
    gen = _seeded("quant", scheme, group, tokens, k, n)
    x, x64 = _rand(gen, (tokens, k), dtype)
    weight, scales64, zeros64 = _quantized(scheme, n, k, group, gen)
    bias, bias64 = _rand(gen, (n,), dtype)
    scales, zeros = scales64.to(dtype), None if zeros64 is None else zeros64.to(dtype)
    prepared = cpu.prepare_linear(weight, bias, scheme, scales, zeros, group)
    got = cpu.linear(x, prepared)
    assert got.dtype == dtype
    # The golden weight is the same quantized one, dequantized in float64.
    golden = ref.prepare_linear(
        weight, bias64, scheme, scales.double(), None if zeros is None else zeros.double(), group
    )
    kind = "w8a8" if scheme is QuantScheme.W8A8 else "quantized"
    assert_close(got, ref.linear(x64, golden), kind, dtype)


# -------------------------------------------------------------------------------------------
# norms
# -------------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 8), (7, 80), (3, 96), (33, 576)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), NORM_SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, hidden: int,
    residual: bool,
) -> None:  # fmt: skip
    gen = _seeded("rms", tokens, hidden, residual)
    x, x64 = _strided(gen, tokens, hidden, dtype)
    w, w64 = _rand(gen, (hidden,), dtype)
    r, r64 = _rand(gen, (tokens, hidden), dtype) if residual else (None, None)
    x_before = x.clone()
    y, s = cpu.rms_norm(x, w, 1e-6, residual=r)
    y_ref, s_ref = ref.rms_norm(x64, w64, 1e-6, residual=r64)
    assert y.dtype == dtype
    assert_close(y, y_ref, "norm", dtype)
    if residual:
        assert s is not None and s.dtype == dtype
        assert_close(s, s_ref, "elementwise", dtype)
    else:
        assert s is None
    assert torch.equal(x, x_before)
    _check_out(lambda out: cpu.rms_norm(x, w, 1e-6, residual=r, out=out), y, lambda res: res[0])


#: The Gemma norms: the shapes above, Gemma 2's hidden size, and a per-head q/k norm (D = 256).
GEMMA_NORM_SHAPES = [*NORM_SHAPES, (5, 2304), (9 * 4, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), GEMMA_NORM_SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gemma_rms_norm(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, hidden: int,
    residual: bool,
) -> None:  # fmt: skip
    gen = _seeded("gemma_rms", tokens, hidden, residual)
    x, x64 = _strided(gen, tokens, hidden, dtype)
    w, w64 = _rand(gen, (hidden,), dtype, 0.5)
    r, r64 = _rand(gen, (tokens, hidden), dtype) if residual else (None, None)
    x_before = x.clone()
    y, s = cpu.gemma_rms_norm(x, w, 1e-6, residual=r)
    s64 = x64 if r64 is None else (x64 + r64).to(dtype).double()  # the rounded sum
    y_ref, _ = ref.gemma_rms_norm(s64, w64, 1e-6)
    assert y.dtype == dtype
    assert_close(y, y_ref, "norm", dtype)
    if residual:
        assert s is not None and r is not None
        assert torch.equal(s, (x.float() + r.float()).to(dtype))
    else:
        assert s is None
    assert torch.equal(x, x_before)
    want = cpu.gemma_rms_norm(x, w, 1e-6, residual=r)[0]
    _check_out(lambda out: cpu.gemma_rms_norm(x, w, 1e-6, residual=r, out=out), want,
               lambda res: res[0])  # fmt: skip


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("kernels", [True, False], ids=["c", "torch"])
def test_gemma_rms_norm_paths_agree_with_the_reference(
    ref: TorchBackend, dtype: torch.dtype, kernels: bool
) -> None:
    """The C kernel and the torch path (fp16, or no kernels) against the reference in the
    same dtype: (x * inv) * (1 + w) rounded once, so the two differ by what the order of the
    sum of squares changes (a few fp32 ulps) and, in bf16/fp16, one ulp where that flips a
    rounding."""
    backend = CpuBackend(use_kernels=kernels)
    gen = _seeded("gemma_rms_paths", dtype)
    x, _ = _rand(gen, (17, 320), dtype, 2.0)
    w, _ = _rand(gen, (320,), dtype)
    r, _ = _rand(gen, (17, 320), dtype)
    y, s = backend.gemma_rms_norm(x, w, 1e-6, residual=r)
    y_ref, s_ref = ref.gemma_rms_norm(x, w, 1e-6, residual=r)
    assert s is not None and s_ref is not None and torch.equal(s, s_ref)
    ulp = (y.double() - y_ref.double()).abs() / y_ref.double().abs().clamp_min(1e-30)
    assert float(ulp.max()) <= (2.0**-20 if dtype == F32 else 2.0**-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), NORM_SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, hidden: int, bias: bool
) -> None:
    gen = _seeded("layer_norm", tokens, hidden, bias)
    x, x64 = _rand(gen, (tokens, hidden), dtype, 3.0)
    w, w64 = _rand(gen, (hidden,), dtype)
    b, b64 = _rand(gen, (hidden,), dtype) if bias else (None, None)
    got = cpu.layer_norm(x, w, b, 1e-5)
    assert_close(got, ref.layer_norm(x64, w64, b64, 1e-5), "norm", dtype)
    _check_out(lambda out: cpu.layer_norm(x, w, b, 1e-5, out=out), got)


# -------------------------------------------------------------------------------------------
# rotary embedding
# -------------------------------------------------------------------------------------------


def _cos_sin_cache(max_pos: int, rot: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rot, 2, dtype=F64) / rot)
    angles = torch.outer(torch.arange(max_pos, dtype=F64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()  # (P, R)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hq", "hkv", "d", "rot"),
    [(1, 4, 4, 64, 64), (7, 6, 2, 80, 80), (5, 8, 2, 96, 48), (33, 9, 3, 64, 32)],
)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rotary_embedding(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, hq: int, hkv: int,
    d: int, rot: int, neox: bool,
) -> None:  # fmt: skip
    gen = _seeded("rotary", tokens, hq, hkv, d, rot, neox)
    cache = _cos_sin_cache(4096, rot)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    qkv, qkv64 = _rand(gen, (tokens, (hq + 2 * hkv) * d), dtype)
    q, k, v = torch.split(qkv, [hq * d, hkv * d, hkv * d], -1)
    q64, k64, _ = torch.split(qkv64, [hq * d, hkv * d, hkv * d], -1)
    v_before = v.clone()
    rq, rk = cpu.rotary_embedding(positions, q, k, cache, d, neox)
    ref.rotary_embedding(positions, q64, k64, cache, d, neox)
    assert rq.data_ptr() == q.data_ptr() and rk.data_ptr() == k.data_ptr()
    assert_close(q, q64, "rotary", dtype)
    assert_close(k, k64, "rotary", dtype)
    assert torch.equal(v, v_before)


# -------------------------------------------------------------------------------------------
# KV cache and paged attention
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attn:
    """One attention case: sequences as (cached, new) token counts and the cache geometry."""

    contexts: list[tuple[int, int]]
    block_size: int
    hq: int
    hkv: int
    d: int
    strided: bool = True  # the query is a view out of a fused qkv tensor
    extra_blocks: int = 3  # unused blocks, filled with other random values
    pad: int = field(default=10_000)  # block-table padding: any value is allowed

    def __str__(self) -> str:
        ctx = "+".join(f"{c}:{n}" for c, n in self.contexts)
        return f"{ctx}-bs{self.block_size}-{self.hq}x{self.hkv}-d{self.d}"

    def metadata(self, gen: torch.Generator) -> tuple[AttentionMetadata, int]:
        need = [-(-(c + n) // self.block_size) for c, n in self.contexts]
        num_blocks = sum(need) + self.extra_blocks
        order = torch.randperm(num_blocks, generator=gen).tolist()
        tables = np.full((len(need), max(need)), self.pad, dtype=np.int32)
        slots = []
        for b, ((cached, new), n_blocks) in enumerate(zip(self.contexts, need, strict=True)):
            tables[b, :n_blocks] = [order.pop() for _ in range(n_blocks)]
            for p in range(cached, cached + new):
                slots.append(
                    int(tables[b, p // self.block_size]) * self.block_size + p % self.block_size
                )
        starts = np.concatenate([[0], np.cumsum([n for _, n in self.contexts])])
        lens = np.array([c + n for c, n in self.contexts])
        return AttentionMetadata(starts, lens, tables, np.array(slots), self.block_size), num_blocks


PREFILL_CASES = [
    Attn([(0, 1)], 16, 4, 4, 64),
    Attn([(0, 16)], 16, 8, 2, 64),
    Attn([(0, 17)], 16, 6, 2, 80),
    Attn([(16, 16), (5, 3), (0, 7)], 16, 8, 8, 96, strided=False),
    Attn([(15, 1), (31, 2)], 16, 4, 4, 64),
    Attn([(180, 12)], 16, 4, 1, 64),
    Attn([(33, 2), (0, 1), (60, 5)], 8, 12, 4, 128),
    Attn([(40, 9)], 32, 3, 3, 80),
]
DECODE_CASES = [
    Attn([(0, 1)], 16, 4, 4, 64),
    Attn([(15, 1)], 16, 8, 2, 64),
    Attn([(16, 1)], 16, 6, 2, 80),
    Attn([(5, 1), (31, 1), (64, 1)], 16, 8, 8, 96, strided=False),
    Attn([(300, 1)], 16, 8, 2, 80),
    Attn([(7, 1)] * 8, 8, 6, 2, 96),
    Attn([(2, 1), (100, 1)], 32, 4, 1, 128),
]
VARIANTS = {"causal": (None, None), "window": (7, None), "softcap": (None, 30.0), "both": (5, 10.0)}


def _attention_inputs(case: Attn, dtype: torch.dtype, gen: torch.Generator) -> dict[str, Any]:
    meta, num_blocks = case.metadata(gen)
    cache_shape = (num_blocks, case.block_size, case.hkv, case.d)
    kc, kc64 = _rand(gen, cache_shape, dtype)
    vc, vc64 = _rand(gen, cache_shape, dtype)
    width = case.hq * case.d
    if case.strided:
        q, q64 = _strided(gen, meta.num_tokens, width, dtype, extra=2 * case.hkv * case.d)
    else:
        q, q64 = _rand(gen, (meta.num_tokens, width), dtype)
    return {"meta": meta, "cpu": (q, kc, vc), "ref": (q64, kc64, vc64)}


def _attention_case_params(cases: list[Attn]) -> list[Any]:
    params = [pytest.param(c, "causal", id=str(c)) for c in cases]
    for variant in ("window", "softcap", "both"):
        params += [pytest.param(c, variant, id=f"{c}-{variant}") for c in cases[1::3]]
    return params


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "variant"), _attention_case_params(PREFILL_CASES))
def test_paged_attention_prefill(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, case: Attn, variant: str
) -> None:
    gen = _seeded("prefill", str(case), variant)
    inputs = _attention_inputs(case, dtype, gen)
    window, cap = VARIANTS[variant]
    scale = 1 / math.sqrt(case.d)
    meta = inputs["meta"]
    got = cpu.paged_attention_prefill(*inputs["cpu"], meta, scale, window, cap)
    want = ref.paged_attention_prefill(*inputs["ref"], meta, scale, window, cap)
    assert got.dtype == dtype
    assert_close(got, want, "attention", dtype)
    _check_out(
        lambda out: cpu.paged_attention_prefill(*inputs["cpu"], meta, scale, window, cap, out=out),
        got,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "variant"), _attention_case_params(DECODE_CASES))
def test_paged_attention_decode(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, case: Attn, variant: str
) -> None:
    gen = _seeded("decode", str(case), variant)
    inputs = _attention_inputs(case, dtype, gen)
    window, cap = VARIANTS[variant]
    scale = 1 / math.sqrt(case.d)
    meta = inputs["meta"]
    got = cpu.paged_attention_decode(*inputs["cpu"], meta, scale, window, cap)
    want = ref.paged_attention_decode(*inputs["ref"], meta, scale, window, cap)
    assert got.dtype == dtype
    assert_close(got, want, "attention", dtype)
    _check_out(
        lambda out: cpu.paged_attention_decode(*inputs["cpu"], meta, scale, window, cap, out=out),
        got,
    )


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.float16, id="fp16"),
        pytest.param(F64, id="fp64"),
        pytest.param(F32, id="fp32"),
    ],
)
@pytest.mark.parametrize("variant", ["softcap", "both"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_soft_capped_attention_in_torch_runs_the_backends_own_path(
    ref: TorchBackend, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, variant: str,
    decode: bool,
) -> None:  # fmt: skip
    """Where the C kernel does not apply (fp16, fp64, no kernels), soft-capped attention is
    computed by the backend's torch path, never handed back to the reference."""
    backend = CpuBackend(use_kernels=dtype != F32)
    calls: list[str] = []

    def spy(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return method(*args, **kwargs)

        return call

    for name in ("paged_attention_prefill", "paged_attention_decode"):
        monkeypatch.setattr(TorchBackend, name, spy(name, getattr(TorchBackend, name)))
    case = DECODE_CASES[5] if decode else PREFILL_CASES[6]
    gen = _seeded("eager-softcap", str(case), variant, dtype)
    inputs = _attention_inputs(case, dtype, gen)
    window, cap = VARIANTS[variant]
    scale = 1 / math.sqrt(case.d)
    meta = inputs["meta"]
    op = "paged_attention_decode" if decode else "paged_attention_prefill"
    got = getattr(backend, op)(*inputs["cpu"], meta, scale, window, cap)
    assert calls == [], "the reference ran"
    monkeypatch.undo()
    want = getattr(ref, op)(*inputs["ref"], meta, scale, window, cap)
    assert_close(got, want, "attention", dtype)


def test_decode_metadata_reused_across_window_and_global_layers(
    cpu: CpuBackend, ref: TorchBackend
) -> None:
    # Models like Gemma alternate sliding-window and global layers over one step's metadata.
    case = Attn([(40, 1), (9, 1)], 8, 4, 2, 64, pad=0)
    inputs = _attention_inputs(case, F32, _seeded("window-reuse"))
    meta = inputs["meta"]
    for window in (4, None, 4):
        got = cpu.paged_attention_decode(*inputs["cpu"], meta, 0.125, window)
        want = ref.paged_attention_decode(*inputs["ref"], meta, 0.125, window)
        assert_close(got, want, "attention", F32)


def test_paged_attention_decode_refuses_multi_token(cpu: CpuBackend) -> None:
    inputs = _attention_inputs(Attn([(3, 2)], 4, 2, 2, 8), F32, _seeded("refuse"))
    with pytest.raises(ValueError, match="one new token"):
        cpu.paged_attention_decode(*inputs["cpu"], inputs["meta"], 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("case", "padding"),
    [(Attn([(0, 1)], 16, 4, 4, 64), 0), (Attn([(3, 13), (0, 16)], 16, 2, 2, 80), 3),
     (Attn([(30, 2)] * 3, 8, 3, 3, 96), 1)],
    ids=["1tok", "block-edges", "padded"],
)  # fmt: skip
def test_reshape_and_cache(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, case: Attn, padding: int
) -> None:
    gen = _seeded("cache", str(case), padding)
    meta, num_blocks = case.metadata(gen)
    # Padding tokens (slot -1) are interleaved with real ones and must not be written.
    slots = list(meta.slot_mapping)
    for i in range(padding):
        slots.insert(2 * i, -1)
    meta = AttentionMetadata(
        np.array([0, len(slots)]), np.array([len(slots)]), meta.block_tables[:1],
        np.array(slots), case.block_size,
    )  # fmt: skip
    width = case.hkv * case.d
    kv, kv64 = _rand(gen, (len(slots), 2 * width), dtype)
    key, value = torch.split(kv, [width, width], -1)
    key64, value64 = torch.split(kv64, [width, width], -1)
    kc, kc64 = _rand(gen, (num_blocks, case.block_size, case.hkv, case.d), dtype)
    vc, vc64 = _rand(gen, (num_blocks, case.block_size, case.hkv, case.d), dtype)
    cpu.reshape_and_cache(key, value, kc, vc, meta)
    ref.reshape_and_cache(key64, value64, kc64, vc64, meta)
    assert_close(kc, kc64, "exact", dtype)
    assert_close(vc, vc64, "exact", dtype)


# -------------------------------------------------------------------------------------------
# activations, elementwise, gather
# -------------------------------------------------------------------------------------------

ACT_SHAPES = [(1, 16), (7, 160), (33, 688)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "width"), ACT_SHAPES)
@pytest.mark.parametrize(
    "op", ["silu_and_mul", "gelu_and_mul", "gelu_and_mul-tanh", "gelu", "gelu-tanh"]
)
def test_activations(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, width: int, op: str
) -> None:
    gen = _seeded("act", tokens, width, op)
    x, x64 = _strided(gen, tokens, width, dtype)
    name, _, approx = op.partition("-")
    kwargs = {} if name == "silu_and_mul" else {"approximate": approx or "none"}
    got = getattr(cpu, name)(x, **kwargs)
    assert got.dtype == dtype
    assert_close(got, getattr(ref, name)(x64, **kwargs), "elementwise", dtype)
    _check_out(lambda out: getattr(cpu, name)(x, out=out, **kwargs), got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "width"), ACT_SHAPES)
def test_add(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, width: int
) -> None:
    gen = _seeded("add", tokens, width)
    a, a64 = _strided(gen, tokens, width, dtype)
    b, b64 = _rand(gen, (tokens, width), dtype)
    got = cpu.add(a, b)
    assert_close(got, ref.add(a64, b64), "elementwise", dtype)
    _check_out(lambda out: cpu.add(a, b, out=out), got)


#: Gemma's embedding scales sqrt(H): exact (48), and rounded in bf16 (sqrt(2560) -> 50.5).
SCALE_FACTORS = [48.0, 2560**0.5, 0.1]


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize(("tokens", "width"), ACT_SHAPES)
@pytest.mark.parametrize("factor", SCALE_FACTORS)
def test_scale(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, width: int,
    factor: float,
) -> None:  # fmt: skip
    gen = _seeded("scale", tokens, width, factor)
    x, x64 = _strided(gen, tokens, width, dtype)
    got = cpu.scale(x, factor)
    assert got.dtype == dtype
    rounded = float(torch.tensor(factor).to(dtype))
    assert_close(got, ref.scale(x64, rounded), "elementwise", dtype)
    # The product of two values of x's dtype is exact in fp32: one rounding, bit for bit.
    assert torch.equal(got, x * torch.tensor(factor, dtype=dtype))
    _check_out(lambda out: cpu.scale(x, factor, out=out), got)


#: Logits near 1, around the cap, far past it (saturation), with inf and NaN.
SOFT_CAP_SCALES = [1.0, 30.0, 1e3]


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 32), (5, 1000), (3, 40001)])
@pytest.mark.parametrize("spread", SOFT_CAP_SCALES)
def test_soft_cap(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, rows: int, vocab: int, spread: float
) -> None:
    gen = _seeded("soft_cap", rows, vocab, spread)
    x, x64 = _strided(gen, rows, vocab, dtype)
    x.mul_(spread)
    x[0, :2] = torch.tensor([float("inf"), -float("inf")], dtype=dtype)
    x64 = x.double()
    got = cpu.soft_cap(x, 30.0)
    assert got.dtype == dtype
    assert_close(got, ref.soft_cap(x64, 30.0), "elementwise", dtype)
    assert got[0, :2].tolist() == [30.0, -30.0]
    _check_out(lambda out: cpu.soft_cap(x, 30.0, out=out), got)
    assert torch.isnan(cpu.soft_cap(torch.full((2, 9), float("nan"), dtype=dtype), 30.0)).all()
    for bad in (0.0, -30.0):
        with pytest.raises(ValueError, match="cap > 0"):
            cpu.soft_cap(x, bad)


def test_gemma_operators_run_as_c_kernels_in_a_captured_step(cpu: CpuBackend) -> None:
    """The decode step of a Gemma model is captured: the three operators record C kernels, and
    a replay recomputes them from the inputs' current values."""
    gen = _seeded("gemma-capture")
    x, _ = _rand(gen, (2, 64), F32)
    w, _ = _rand(gen, (64,), F32)
    logits, _ = _rand(gen, (2, 500), F32, 40.0)
    outputs: dict[str, torch.Tensor] = {}

    def step() -> None:
        h = cpu.scale(x, 8.0)
        outputs["norm"], _ = cpu.gemma_rms_norm(h, w, 1e-6)
        outputs["capped"] = cpu.soft_cap(logits, 30.0)

    graph = cpu.capture_graph(step)
    assert isinstance(graph, CpuGraph) and len(graph) == 3
    x.copy_(_rand(gen, (2, 64), F32)[0])
    logits.copy_(_rand(gen, (2, 500), F32, 40.0)[0])
    graph.replay()
    assert_close(outputs["norm"], cpu.gemma_rms_norm(cpu.scale(x, 8.0), w, 1e-6)[0], "exact", F32)
    assert_close(outputs["capped"], cpu.soft_cap(logits, 30.0), "exact", F32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden", "rows"), [(1, 8, 1), (17, 80, 3), (40, 576, 40)])
def test_gather_rows(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, hidden: int, rows: int
) -> None:
    gen = _seeded("gather", tokens, hidden, rows)
    x, x64 = _rand(gen, (tokens, hidden), dtype)
    idx = torch.randint(0, tokens, (rows,), generator=gen)
    got = cpu.gather_rows(x, idx)
    assert_close(got, ref.gather_rows(x64, idx), "exact", dtype)
    _check_out(lambda out: cpu.gather_rows(x, idx, out=out), got)


# -------------------------------------------------------------------------------------------
# logits processing and sampling (logits are fp32 by contract)
# -------------------------------------------------------------------------------------------

LOGIT_SHAPES = [(1, 32), (5, 1000)]


@pytest.mark.parametrize(("rows", "vocab"), LOGIT_SHAPES)
def test_apply_penalties(cpu: CpuBackend, ref: TorchBackend, rows: int, vocab: int) -> None:
    gen = _seeded("penalties", rows, vocab)
    logits, logits64 = _rand(gen, (rows, vocab), F32, 4.0)
    prompt = torch.randint(-1, vocab, (rows, 12), generator=gen).numpy()
    output = torch.randint(-1, vocab, (rows, 20), generator=gen).numpy()
    settings = torch.rand((3, rows), generator=gen).numpy()
    meta = PenaltyMetadata(prompt, output, settings[0], settings[1], 1 + settings[2])
    assert cpu.apply_penalties(logits, meta) is logits
    ref.apply_penalties(logits64, meta)
    assert_close(logits, logits64, "softmax", F32)


def test_apply_token_bans(cpu: CpuBackend, ref: TorchBackend) -> None:
    gen = _seeded("bans")
    logits, logits64 = _rand(gen, (4, 50), F32)
    banned = torch.tensor([[3, -1, -1], [-1, -1, -1], [0, 49, 7], [7, 7, -1]])
    assert cpu.apply_token_bans(logits, banned) is logits
    ref.apply_token_bans(logits64, banned)
    assert_close(logits, logits64, "exact", F32)
    assert int(torch.isinf(logits).sum()) == 5


#: (rows, vocab) of the token-mask tests: one row inside one partial word; whole words; a
#: partial last word (1000 = 31 * 32 + 8); the demo model's vocabulary.
BITMASK_SHAPES = [(1, 8), (4, 64), (6, 1000), (3, 49152)]


def _token_bitmask(gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """(rows, ceil(vocab / 32)) int32 masks; row r % 3: random words (bit 31 set in about half
    of them, bits past the vocabulary random too), all allowed (-1), one token allowed."""
    words = -(-vocab // 32)
    mask = torch.randint(-(2**31), 2**31, (rows, words), generator=gen).to(torch.int32)
    for r in range(1, rows, 3):
        mask[r] = -1
    for r in range(2, rows, 3):
        token = int(torch.randint(0, vocab, (1,), generator=gen))
        mask[r] = 0
        mask[r, token // 32] = int(np.array(1 << token % 32, np.uint32).view(np.int32))
    return mask


@pytest.mark.parametrize(("rows", "vocab"), BITMASK_SHAPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_apply_token_bitmask(
    cpu: CpuBackend, ref: TorchBackend, rows: int, vocab: int, strided: bool
) -> None:
    gen = _seeded("bitmask", rows, vocab)
    if strided:  # rows ld > vocab apart: a write past the vocabulary lands in the filler
        full = torch.randn((rows, vocab + 40), generator=gen)
        logits, filler = full[:, :vocab], full[:, vocab:].clone()
    else:
        logits = torch.randn((rows, vocab), generator=gen)
    logits[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    logits64 = logits.double()
    mask = _token_bitmask(gen, rows, vocab)
    assert cpu.apply_token_bitmask(logits, mask) is logits
    ref.apply_token_bitmask(logits64, mask)
    assert_close(logits, logits64, "exact", F32)  # NaN/Inf parity included
    if strided:
        assert torch.equal(full[:, vocab:], filler)


def test_apply_token_bitmask_is_a_c_kernel_with_a_torch_fallback(cpu: CpuBackend) -> None:
    assert "apply_token_bitmask" in cpu.native_ops()
    if cpu._nk is None:
        pytest.skip(f"C kernels unavailable: {cpu.kernels}")
    gen = _seeded("bitmask-fallback")
    logits = torch.randn((5, 300), generator=gen)
    mask = _token_bitmask(gen, 5, 300)
    native, torch_ops = logits.clone(), logits.clone()
    cpu.apply_token_bitmask(native, mask)
    CpuBackend(use_kernels=False).apply_token_bitmask(torch_ops, mask)
    assert torch.equal(native, torch_ops)
    via_int64 = logits.clone()
    cpu.apply_token_bitmask(via_int64, mask.long())  # not int32: the torch path
    assert torch.equal(native, via_int64)
    with pytest.raises(ValueError, match="ceil"):
        cpu.apply_token_bitmask(logits, mask[:, :-1])


def _sampling_meta(rows: int, gen: torch.Generator) -> SamplingMetadata:
    temperature = torch.rand(rows, generator=gen).numpy() * 1.5
    temperature[::3] = 0.0  # some greedy rows
    top_k = torch.randint(0, 20, (rows,), generator=gen).numpy()
    top_p = 0.5 + torch.rand(rows, generator=gen).numpy() / 2
    min_p = torch.rand(rows, generator=gen).numpy() * 0.2
    seeds = torch.randint(0, 2**62, (rows,), generator=gen).numpy()
    return SamplingMetadata(temperature, top_k, top_p, min_p, seeds)


@pytest.mark.parametrize(("rows", "vocab"), [(1, 32), (12, 1000)])
def test_sample(cpu: CpuBackend, ref: TorchBackend, rows: int, vocab: int) -> None:
    gen = _seeded("sample", rows, vocab)
    logits, logits64 = _rand(gen, (rows, vocab), F32, 3.0)
    before = logits.clone()
    meta = _sampling_meta(rows, gen)
    tokens = cpu.sample(logits, meta)
    assert tokens.dtype == torch.int64 and tuple(tokens.shape) == (rows,)
    assert torch.equal(logits, before)
    assert torch.equal(tokens, cpu.sample(logits, meta))  # seeded
    greedy = torch.from_numpy(meta.temperature == 0)
    assert torch.equal(tokens[greedy], logits64.argmax(-1)[greedy])
    # Every draw lies in the support of the reference's filtered distribution.
    probs = ref.filtered_probs(logits64, meta)
    assert bool(torch.all(probs.gather(1, tokens.unsqueeze(1)) > 0))


@pytest.mark.parametrize(("rows", "vocab"), LOGIT_SHAPES)
@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_compute_logprobs(
    cpu: CpuBackend, ref: TorchBackend, rows: int, vocab: int, num_top: int
) -> None:
    gen = _seeded("logprobs", rows, vocab, num_top)
    logits, logits64 = _rand(gen, (rows, vocab), F32, 3.0)
    ids = torch.randint(0, vocab, (rows,), generator=gen)
    got, want = (
        cpu.compute_logprobs(logits, ids, num_top),
        ref.compute_logprobs(logits64, ids, num_top),
    )
    assert_close(got.token_logprobs, want.token_logprobs, "softmax", F32)
    assert_close(got.token_ranks, want.token_ranks, "exact", F32)
    assert_close(got.top_ids, want.top_ids, "exact", F32)
    assert_close(got.top_logprobs, want.top_logprobs, "softmax", F32)


# -------------------------------------------------------------------------------------------
# mixture of experts
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 4, 1), (9, 8, 2), (16, 16, 4)])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_moe_route(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, experts: int,
    top_k: int, renormalize: bool,
) -> None:  # fmt: skip
    gen = _seeded("route", tokens, experts, top_k, renormalize)
    logits, logits64 = _rand(gen, (tokens, experts), dtype)
    weights, ids = cpu.moe_route(logits, top_k, renormalize)
    want_w, want_ids = ref.moe_route(logits64, top_k, renormalize)
    assert weights.dtype == F32 and ids.dtype == torch.int64
    assert_close(ids, want_ids, "exact", dtype)
    assert_close(weights, want_w, "softmax", F32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k"), [(1, 16, 8, 4, 1), (9, 64, 48, 8, 2)]
)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_moe_experts(
    cpu: CpuBackend, ref: TorchBackend, dtype: torch.dtype, tokens: int, hidden: int,
    inter: int, experts: int, top_k: int, activation: str,
) -> None:  # fmt: skip
    gen = _seeded("experts", tokens, hidden, inter, experts, top_k, activation)
    x, x64 = _rand(gen, (tokens, hidden), dtype)
    w13, w13_64 = _rand(gen, (experts, 2 * inter, hidden), dtype, 1 / math.sqrt(hidden))
    w2, w2_64 = _rand(gen, (experts, hidden, inter), dtype, 1 / math.sqrt(inter))
    router = torch.randn((tokens, experts), generator=gen)
    weights, ids = ref.moe_route(router, top_k, True)
    got = cpu.moe_experts(x, w13, w2, weights, ids, activation)
    assert got.dtype == dtype
    want = ref.moe_experts(x64, w13_64, w2_64, weights.double(), ids, activation)
    assert_close(got, want, "linear", dtype)
    _check_out(lambda out: cpu.moe_experts(x, w13, w2, weights, ids, activation, out=out), got)


# -------------------------------------------------------------------------------------------
# collectives (a single process: the identity)
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["all_reduce", "all_gather"])
def test_collectives_single_process(cpu: CpuBackend, dtype: torch.dtype, op: str) -> None:
    x, _ = _rand(_seeded(op), (3, 40), dtype)
    before = x.clone()
    assert_close(getattr(cpu, op)(x), before, "exact", dtype)


# -------------------------------------------------------------------------------------------
# batch invariance: a row computed alone equals the same row in any batch, bit for bit
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def invariant() -> CpuBackend:
    return CpuBackend(batch_invariant=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == BF16 else torch.int32)


def _assert_rows_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    differ = (_bits(got) != _bits(want)).reshape(got.shape[0], -1).any(-1).nonzero()
    assert differ.numel() == 0, f"{what}: rows {differ.flatten().tolist()} depend on the batch"


#: Every path of the linear kernel: batch-1 GEMV, the bf16 register tiles (2-3 tokens), the
#: converted-row tiles (4+), several 48-token passes, and past NATIVE_MAX_TOKENS (64).
INVARIANCE_TOKENS = [1, 2, 3, 4, 5, 8, 9, 16, 33, 49, 64, 65, 130]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [8, 13, 24, 64, 200, 576])  # K % 8, K % 16 = 8, ragged tails
def test_linear_rows_do_not_depend_on_the_batch(
    invariant: CpuBackend, dtype: torch.dtype, k: int
) -> None:
    gen = _seeded("invariant-linear", k)
    n = 46  # 5 eight-row blocks + 6 rows: 4-row tiles and single rows
    x, _ = _rand(gen, (max(INVARIANCE_TOKENS), k), dtype)
    w, _ = _rand(gen, (n, k), dtype, 1 / math.sqrt(k))
    b, _ = _rand(gen, (n,), dtype)
    weight = invariant.prepare_linear(w, b)
    alone = torch.cat([invariant.linear(x[i : i + 1], weight) for i in range(x.shape[0])])
    for tokens in INVARIANCE_TOKENS:
        got = invariant.linear(x[:tokens], weight)
        _assert_rows_equal(got, alone[:tokens], f"linear T={tokens}")
    strided, _ = _strided(gen, 33, k, dtype)
    _assert_rows_equal(
        invariant.linear(strided, weight),
        torch.cat([invariant.linear(strided[i : i + 1], weight) for i in range(33)]),
        "linear, strided rows",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", [QuantScheme.W8A16, QuantScheme.W4A16, QuantScheme.W8A8])
def test_quantized_linear_rows_do_not_depend_on_the_batch(
    invariant: CpuBackend, ref: TorchBackend, dtype: torch.dtype, scheme: QuantScheme
) -> None:
    gen = _seeded("invariant-quant", scheme)
    k, n, group = 128, 40, 0 if scheme is QuantScheme.W8A8 else 32
    x, x64 = _rand(gen, (70, k), dtype)
    weight, scales64, zeros64 = _quantized(scheme, n, k, group, gen)
    scales, zeros = scales64.to(dtype), None if zeros64 is None else zeros64.to(dtype)
    prepared = invariant.prepare_linear(weight, None, scheme, scales, zeros, group)
    golden = ref.prepare_linear(
        weight, None, scheme, scales.double(), None if zeros is None else zeros.double(), group
    )
    kind = "w8a8" if scheme is QuantScheme.W8A8 else "quantized"
    assert_close(invariant.linear(x, prepared), ref.linear(x64, golden), kind, dtype)
    alone = torch.cat([invariant.linear(x[i : i + 1], prepared) for i in range(70)])
    for tokens in (1, 9, 70):
        _assert_rows_equal(invariant.linear(x[:tokens], prepared), alone[:tokens], f"T={tokens}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 64), (4, 2, 64), (6, 2, 80), (8, 1, 32)])
@pytest.mark.parametrize("variant", ["causal", "window", "softcap"])
def test_attention_rows_do_not_depend_on_the_batch_or_the_chunks(
    invariant: CpuBackend, dtype: torch.dtype, hq: int, hkv: int, d: int, variant: str
) -> None:
    """A prompt prefilled whole, in chunks of 1, 7, 13 and 19 tokens, and its last token
    decoded alone or among other sequences: each row the same, bit for bit."""
    gen = _seeded("invariant-attention", hq, hkv, d, variant)
    window, cap = VARIANTS[variant]
    length, bs = 40, 16
    blocks = 3 * 4  # three sequences of up to 64 positions
    kc, _ = _rand(gen, (blocks, bs, hkv, d), dtype)
    vc, _ = _rand(gen, (blocks, bs, hkv, d), dtype)
    q, _ = _rand(gen, (length, hq * d), dtype)
    tables = np.arange(blocks, dtype=np.int32).reshape(3, 4)
    scale = 1 / math.sqrt(d)

    def prefill(a: int, b: int) -> torch.Tensor:  # new tokens a .. b-1 of sequence 0
        meta = AttentionMetadata(np.array([0, b - a]), np.array([b]), tables[:1],
                                 np.zeros(b - a, dtype=np.int64), bs)  # fmt: skip
        return invariant.paged_attention_prefill(q[a:b], kc, vc, meta, scale, window, cap)

    whole = prefill(0, length)
    chunks = torch.cat([prefill(a, b) for a, b in ((0, 1), (1, 8), (8, 21), (21, 40))])
    _assert_rows_equal(chunks, whole, "prefill in chunks")
    alone = invariant.paged_attention_decode(
        q[-1:], kc, vc, AttentionMetadata(np.array([0, 1]), np.array([length]), tables[:1],
                                         np.zeros(1, dtype=np.int64), bs), scale, window, cap,
    )  # fmt: skip
    others, _ = _rand(gen, (2, hq * d), dtype)
    batch = AttentionMetadata(np.arange(4), np.array([length, 17, 64]), tables,
                              np.zeros(3, dtype=np.int64), bs)  # fmt: skip
    decoded = invariant.paged_attention_decode(
        torch.cat([q[-1:], others]), kc, vc, batch, scale, window, cap
    )
    _assert_rows_equal(decoded[:1], alone, "decode in a batch")
    _assert_rows_equal(alone, whole[-1:], "decode vs the prompt's last row")


@pytest.mark.parametrize(
    "op", ["gelu", "gelu-tanh", "gelu_and_mul", "gelu_and_mul-tanh", "silu_and_mul"]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_rows_do_not_depend_on_the_batch(
    invariant: CpuBackend, dtype: torch.dtype, op: str
) -> None:
    """torch's vectorized GELU and its scalar tail differ in the last bit: rows run alone."""
    name, _, approx = op.partition("-")
    kwargs = {} if name == "silu_and_mul" else {"approximate": approx or "none"}
    x, _ = _rand(_seeded("invariant-act", op), (37, 2 * 150), dtype, 3.0)
    alone = torch.cat([getattr(invariant, name)(x[i : i + 1], **kwargs) for i in range(37)])
    for tokens in (1, 5, 37):
        got = getattr(invariant, name)(x[:tokens], **kwargs)
        _assert_rows_equal(got, alone[:tokens], f"{op} T={tokens}")


@pytest.mark.parametrize("op", ["gemma_rms_norm", "gemma_rms_norm-residual", "scale", "soft_cap"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_rows_do_not_depend_on_the_batch(
    invariant: CpuBackend, dtype: torch.dtype, op: str
) -> None:
    gen = _seeded("invariant-gemma", op)
    x, _ = _rand(gen, (37, 2304), dtype, 3.0)
    r, _ = _rand(gen, (37, 2304), dtype)
    w, _ = _rand(gen, (2304,), dtype)
    calls: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "gemma_rms_norm": lambda t, _: invariant.gemma_rms_norm(t, w, 1e-6)[0],
        "gemma_rms_norm-residual": lambda t, res: invariant.gemma_rms_norm(t, w, 1e-6, res)[0],
        "scale": lambda t, _: invariant.scale(t, 2304**0.5),
        "soft_cap": lambda t, _: invariant.soft_cap(t, 5.0),
    }
    fn = calls[op]
    alone = torch.cat([fn(x[i : i + 1], r[i : i + 1]) for i in range(37)])
    for tokens in (1, 5, 37):
        _assert_rows_equal(fn(x[:tokens], r[:tokens]), alone[:tokens], f"{op} T={tokens}")


def test_sampling_rows_do_not_depend_on_the_batch(invariant: CpuBackend) -> None:
    """torch sums one row's probabilities across threads and many rows one per thread: the
    backend filters each row on its own."""
    gen = _seeded("invariant-sample")
    logits = torch.randn((32, 49152), generator=gen) * 2
    meta = _sampling_meta(32, gen)
    meta.temperature[:] = 0.8
    meta.top_k[::2], meta.top_p[::2], meta.min_p[::2] = 0, 1.0, 0.0  # the whole vocabulary
    probs = invariant.filtered_probs(logits, meta)
    tokens = invariant.sample(logits, meta)
    for b in (0, 7, 31):
        row = meta.temperature[b : b + 1], meta.top_k[b : b + 1], meta.top_p[b : b + 1]
        one = SamplingMetadata(*row, meta.min_p[b : b + 1], meta.seeds[b : b + 1])
        _assert_rows_equal(invariant.filtered_probs(logits[b : b + 1], one), probs[b : b + 1],
                           f"filtered_probs row {b}")  # fmt: skip
        assert int(invariant.sample(logits[b : b + 1], one)[0]) == int(tokens[b])


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_rows_do_not_depend_on_the_batch(
    invariant: CpuBackend, ref: TorchBackend, dtype: torch.dtype
) -> None:
    gen = _seeded("invariant-moe")
    tokens, hidden, inter, experts = 9, 64, 48, 8
    x, x64 = _rand(gen, (tokens, hidden), dtype)
    w13, w13_64 = _rand(gen, (experts, 2 * inter, hidden), dtype, 1 / math.sqrt(hidden))
    w2, w2_64 = _rand(gen, (experts, hidden, inter), dtype, 1 / math.sqrt(inter))
    weights, ids = ref.moe_route(torch.randn((tokens, experts), generator=gen), 2, True)
    got = invariant.moe_experts(x, w13, w2, weights, ids)
    want = ref.moe_experts(x64, w13_64, w2_64, weights.double(), ids)
    assert_close(got, want, "linear", dtype)
    alone = torch.cat(
        [invariant.moe_experts(x[i : i + 1], w13, w2, weights[i : i + 1], ids[i : i + 1])
         for i in range(tokens)]
    )  # fmt: skip
    _assert_rows_equal(got, alone, "moe_experts")


#: Where each HAL operator is tested; a new operator must be added here with its test.
COVERAGE: dict[str, Callable[..., None]] = {
    "embedding": test_embedding,
    "linear": test_linear_dense,
    "rms_norm": test_rms_norm,
    "gemma_rms_norm": test_gemma_rms_norm,
    "layer_norm": test_layer_norm,
    "rotary_embedding": test_rotary_embedding,
    "reshape_and_cache": test_reshape_and_cache,
    "paged_attention_prefill": test_paged_attention_prefill,
    "paged_attention_decode": test_paged_attention_decode,
    "silu_and_mul": test_activations,
    "gelu_and_mul": test_activations,
    "gelu": test_activations,
    "add": test_add,
    "scale": test_scale,
    "soft_cap": test_soft_cap,
    "gather_rows": test_gather_rows,
    "apply_penalties": test_apply_penalties,
    "apply_token_bans": test_apply_token_bans,
    "apply_token_bitmask": test_apply_token_bitmask,
    "sample": test_sample,
    "compute_logprobs": test_compute_logprobs,
    "moe_route": test_moe_route,
    "moe_experts": test_moe_experts,
    "all_reduce": test_collectives_single_process,
    "all_gather": test_collectives_single_process,
}


def test_every_op_is_covered() -> None:
    from llm_hal import OPS

    assert set(COVERAGE) == set(OPS), f"untested operators: {sorted(set(OPS) - set(COVERAGE))}"
