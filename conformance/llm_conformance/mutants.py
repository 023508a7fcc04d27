"""The mutants of the operator suite's mutation pass (:mod:`llm_conformance.mutation`).

Each :class:`Mutant` is the reference backend (:class:`llm_hal.TorchBackend`) with one method
changed in one small way a kernel author could get wrong: an index off by one, operands
swapped, a term dropped, accumulation in low precision, a wrong mask. Most are knobs of one
copy of the reference operator (``_attention(causal_shift=1)``, ``_linear(bias=0)``): each
knob's default is the reference's behaviour. A mutant that no valid input tells from the
reference, within the tolerance table, is declared ``equivalent`` here, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from llm_hal import DType, LogprobsResult, QuantScheme, TorchBackend
from llm_hal.dtypes import to_torch
from llm_hal.reference import _acc, _acc_dtype, _into, dequantize, dtype_rounded

FP32, BF16, FP16, FP64 = DType.FP32, DType.BF16, DType.FP16, DType.FP64
Method = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Mutant:
    """One changed method of the reference, and the operator whose check must fail."""

    op: str
    name: str
    what: str
    methods: tuple[tuple[str, Method], ...]
    #: Where the mutant is run (fp32 alone for the logits operators).
    dtypes: tuple[DType, ...] = (FP32, BF16)
    #: Non-empty: no valid input tells this mutant from the reference beyond tolerance; why.
    equivalent: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"

    def backend(self) -> TorchBackend:
        """The reference on the CPU with this one change."""
        attrs: dict[str, Any] = {"name": f"mutant-{self.name}", **dict(self.methods)}
        cls = type(f"Mutant_{self.name.replace('-', '_')}", (TorchBackend,), attrs)
        return cls("cpu")


MUTANTS: list[Mutant] = []


#: One table row: name, what changed, the method that replaces the reference's, and options
#: (``BF16_ONLY``, ``equivalent(reason)``, or both joined with ``|``).
Row = tuple[Any, ...]
BF16_ONLY: dict[str, Any] = {"dtypes": (BF16,)}


def equivalent(reason: str) -> dict[str, Any]:
    """Row option: no valid input tells this mutant from the reference, because ``reason``."""
    return {"equivalent": reason}


def register(op: str, rows: Iterable[Row], *, on: str | None = None) -> None:
    """Add the mutants of ``op``; each row's method replaces the reference's ``on`` (default:
    the operator itself)."""
    for name, what, method, *options in rows:
        opts: dict[str, Any] = options[0] if options else {}
        dtypes = opts.get("dtypes", (FP32, BF16))
        MUTANTS.append(
            Mutant(op, name, what, ((on or op, method),), dtypes, opts.get("equivalent", ""))
        )


def _bits_to_bf16_toward_zero(x: torch.Tensor) -> torch.Tensor:
    kept = x.float().contiguous().view(torch.int32) & -65536  # keep the top 16 bits
    return kept.view(torch.float32).to(torch.bfloat16)


def _accumulate(terms: torch.Tensor, dtype: torch.dtype, chunk: int = 1) -> torch.Tensor:
    """Sum ``terms (..., n)`` over the last dimension in ``dtype``, rounding after every
    ``chunk`` terms: what a kernel that accumulates in the activation dtype computes."""
    total = torch.zeros(terms.shape[:-1], dtype=dtype)
    for start in range(0, terms.shape[-1], chunk):
        part = terms[..., start : start + chunk].to(torch.float32).sum(dim=-1)
        total = (total.to(torch.float32) + part).to(dtype)
    return total


def _as_contiguous(method: Method) -> Method:
    """``method`` reading its first argument's rows as if they were packed (stride = width):
    a kernel that ignores the row stride of a strided view."""

    def packed(self: TorchBackend, x: Any, *args: Any, **kwargs: Any) -> Any:
        rows, width = x.shape
        return method(self, torch.as_strided(x, (rows, width), (width, 1)), *args, **kwargs)

    return packed


# -------------------------------------------------------------------------------------------
# memory and device contract
# -------------------------------------------------------------------------------------------


def _from_host_toward_zero(self: TorchBackend, data: Any, dtype: DType | None = None) -> Any:
    t = TorchBackend.from_host(self, data)
    if dtype is DType.BF16 and t.is_floating_point():
        return _bits_to_bf16_toward_zero(t)
    return TorchBackend.from_host(self, data, dtype)


def _from_host_half_away(self: TorchBackend, data: Any, dtype: DType | None = None) -> Any:
    t = TorchBackend.from_host(self, data)
    if dtype is DType.BF16 and t.is_floating_point():
        bits = (t.float().view(torch.int32) + 0x8000) & -65536  # ties away from zero
        return bits.view(torch.float32).to(torch.bfloat16)
    return TorchBackend.from_host(self, data, dtype)


def _from_host_via_fp32(self: TorchBackend, data: Any, dtype: DType | None = None) -> Any:
    t = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    if t.is_floating_point() and dtype in (DType.BF16, DType.FP16):
        return t.to(torch.float32).to(to_torch(dtype)).clone()
    return TorchBackend.from_host(self, data, dtype)


def _from_host_alias(self: TorchBackend, data: Any, dtype: DType | None = None) -> Any:
    t = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
    target = to_torch(dtype) if dtype is not None else t.dtype
    return t.to(target)  # no copy when the dtype already matches: an alias of the host data


register(
    "from_host",
    [
        (
            "round-toward-zero",
            "bf16 conversion truncates the mantissa instead of rounding to nearest even",
            _from_host_toward_zero,
            BF16_ONLY,
        ),
        (
            "ties-away",
            "bf16 conversion as (bits + 0x8000) >> 16: ties away from zero, not to even",
            _from_host_half_away,
            BF16_ONLY,
        ),
        (
            "double-rounding",
            "float64 host data converted to bf16/fp16 through float32 (two roundings)",
            _from_host_via_fp32,
            equivalent(
                "torch's own float64 -> bf16/fp16 conversion goes through float32, and the "
                "contract is torch's rounding"
            ),
        ),
        ("alias", "returns the host tensor itself when no conversion is needed", _from_host_alias),
        (
            "ignores-dtype",
            "keeps the host dtype whatever dtype is asked for",
            lambda self, data, dtype=None: TorchBackend.from_host(self, data),
        ),
    ],
)


def _to_host_view(self: TorchBackend, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous()  # the device memory itself on a CPU device


register(
    "to_host",
    [
        ("view", "returns the device memory itself, not a copy", _to_host_view),
        (
            "upcast",
            "returns bf16 tensors as float32",
            lambda self, tensor: TorchBackend.to_host(self, tensor).float(),
            BF16_ONLY,
        ),
    ],
)


def _copy_toward_zero(self: TorchBackend, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if dst.dtype == torch.bfloat16 and src.dtype != torch.bfloat16:
        return dst.copy_(_bits_to_bf16_toward_zero(src))
    return dst.copy_(src)


def _copy_first_row(self: TorchBackend, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    dst[:1].copy_(src[:1])
    return dst


def _copy_one_past(self: TorchBackend, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    dst.copy_(src)
    if dst.dim() == 2 and dst.stride(0) > dst.shape[1]:
        rows, n = dst.shape
        torch.as_strided(dst, (rows, n + 1), dst.stride(), dst.storage_offset())[:, n] = 0
    return dst


register(
    "copy_",
    [
        ("round-toward-zero", "float32 to bf16 copies truncate", _copy_toward_zero, BF16_ONLY),
        ("returns-src", "returns src instead of dst", lambda self, dst, src: src),
        ("first-row", "copies the first row only", _copy_first_row),
        ("one-past", "also writes one element past each row of a view", _copy_one_past),
    ],
)


def _reshape_storage(self: TorchBackend, tensor: torch.Tensor, shape: Sequence[int]) -> Any:
    # Reinterprets the storage from the first element, as if every view were contiguous.
    n = tensor.numel()
    dims = list(shape)
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = n // known
    strides = [int(np.prod(dims[i + 1 :])) for i in range(len(dims))]
    return torch.as_strided(tensor, dims, strides, tensor.storage_offset())


register(
    "reshape",
    [
        ("storage-order", "reshapes a strided view as if it were contiguous", _reshape_storage),
        (
            "copy",
            "returns a contiguous copy instead of a view",
            lambda self, tensor, shape: tensor.reshape(tuple(shape)).clone(),
            equivalent("the contract allows a copy where the backend cannot view"),
        ),
        (
            "upcast",
            "returns float32 whatever the dtype",
            lambda self, tensor, shape: tensor.reshape(tuple(shape)).float(),
            BF16_ONLY,
        ),
    ],
)


def _split_off_by_one(self: TorchBackend, tensor: torch.Tensor, sizes: Sequence[int]) -> Any:
    sizes = list(sizes)
    sizes[0] += 1
    sizes[-1] -= 1
    return list(torch.split(tensor, sizes, dim=-1))


register(
    "split",
    [
        ("off-by-one", "the first part takes one column of the last", _split_off_by_one),
        (
            "copies",
            "returns contiguous copies instead of views",
            lambda self, tensor, sizes: [
                p.clone() for p in torch.split(tensor, list(sizes), dim=-1)
            ],
            equivalent("the contract allows copies; callers never rely on views"),
        ),
        (
            "reversed",
            "returns the parts in reverse order",
            lambda self, tensor, sizes: list(torch.split(tensor, list(sizes), dim=-1))[::-1],
        ),
    ],
)


def _cache_shared(self: TorchBackend, blocks: int, bs: int, hkv: int, d: int, dtype: DType) -> Any:
    cache = torch.zeros((blocks, bs, hkv, d), dtype=to_torch(dtype))
    return cache, cache


def _cache_transposed(
    self: TorchBackend, blocks: int, bs: int, hkv: int, d: int, dtype: DType
) -> Any:
    shape = (blocks, hkv, bs, d)
    return torch.zeros(shape, dtype=to_torch(dtype)), torch.zeros(shape, dtype=to_torch(dtype))


def _cache_fp32(self: TorchBackend, blocks: int, bs: int, hkv: int, d: int, dtype: DType) -> Any:
    return TorchBackend.allocate_kv_cache(self, blocks, bs, hkv, d, FP32)


register(
    "allocate_kv_cache",
    [
        ("shared", "key and value are one tensor", _cache_shared),
        ("head-major", "(blocks, heads, slots, D) layout", _cache_transposed),
        ("fp32", "always allocates float32", _cache_fp32, BF16_ONLY),
    ],
)

# -------------------------------------------------------------------------------------------
# embedding and linear
# -------------------------------------------------------------------------------------------


def _embedding(shift: int = 0, clamp_top: int = 0) -> Method:
    def embedding(self: TorchBackend, ids: Any, table: Any, out: Any = None) -> Any:
        idx = ids.long() + shift
        idx = idx.clamp(0, max(table.shape[0] - 1 - clamp_top, 0))
        return _into(out, F.embedding(idx, table))

    return embedding


register(
    "embedding",
    [
        ("id-plus-one", "reads row id + 1", _embedding(shift=1)),
        ("last-row", "never reads the last row (clamps to V - 2)", _embedding(clamp_top=1)),
        (
            "int32-ids",
            "passes int32 ids on without widening them",
            lambda self, ids, table, out=None: _into(out, F.embedding(ids, table)),
            equivalent("torch's embedding reads int32 ids as they are: the same rows"),
        ),
    ],
)


def _embedding_via_fp32(self: TorchBackend, ids: Any, table: Any, out: Any = None) -> Any:
    wide = table.float() if table.element_size() < 4 else table
    return _into(out, F.embedding(ids.long(), wide).to(table.dtype))


register(
    "embedding",
    [
        (
            "fp32-round-trip",
            "gathers a 16-bit table in float32 and converts back",
            _embedding_via_fp32,
            equivalent("bf16 and fp16 -> fp32 -> back is exact: the same bits"),
        ),
    ],
)


def _linear(
    *,
    bias: int = 1,
    weight_layout: str = "nk",
    acc_in_dtype: bool = False,
    nibbles: str = "lo-hi",
    zeros: bool = True,
    group_scales: str = "interleave",
    act_scale: str = "row",
    act_round: str = "nearest",
) -> Method:
    """The reference linear, with one knob turned: ``bias`` times the bias is added,
    ``weight_layout="kn"`` reads the (N, K) weight as (K, N); ``acc_in_dtype`` accumulates
    in the activation dtype; quantized schemes: nibble order, zero points, how group scales
    expand along K, W8A8's activation scale (per row or per tensor) and rounding."""

    def dequant(w: Any, acc: torch.dtype) -> torch.Tensor:
        if w.scheme in (QuantScheme.NONE, QuantScheme.W8A8):
            return dequantize(w).to(acc)
        if w.scheme is QuantScheme.W4A16:
            lo, hi = (w.weight & 0x0F).to(acc), (w.weight >> 4).to(acc)
            pair = (lo, hi) if nibbles == "lo-hi" else (hi, lo)
            q = torch.stack(pair, dim=-1).reshape(w.out_features, w.in_features)
        else:
            q = w.weight.to(acc)
        group = w.group_size or w.in_features
        if group_scales == "interleave":
            scales = w.scales.to(acc).repeat_interleave(group, dim=1)
        elif group_scales == "tile":
            scales = w.scales.to(acc).repeat(1, group)
        else:  # the first group's scale everywhere
            scales = w.scales[:, :1].to(acc).expand(-1, w.in_features)
        if w.zeros is not None and zeros:
            q = q - w.zeros.to(acc).repeat_interleave(group, dim=1)
        return q * scales

    def linear(self: TorchBackend, x: Any, weight: Any, out: Any = None) -> Any:
        acc = _acc_dtype(x.dtype)
        if weight.scheme is QuantScheme.W8A8:
            xf = x.to(acc)
            amax = xf.abs().amax(dim=-1, keepdim=True)
            if act_scale == "tensor":
                amax = amax.amax().expand_as(amax)
            a_scale = amax.clamp_min(1e-12) / 127.0
            xs = xf / a_scale
            xs = torch.round(xs) if act_round == "nearest" else torch.trunc(xs)
            xq = torch.clamp(xs, -127, 127)
            y = (xq.double() @ weight.weight.double().T).to(acc)
            y = y * a_scale * weight.scales.to(acc).reshape(1, -1)
        else:
            w = dequant(weight, acc)
            if weight_layout == "kn":
                w = w.reshape(w.shape[1], w.shape[0]).T
            if acc_in_dtype:
                terms = x.to(acc).unsqueeze(1) * w.unsqueeze(0)  # (T, N, K)
                y = _accumulate(terms, x.dtype, chunk=8).to(acc)
            else:
                y = x.to(acc) @ w.T
        if weight.bias is not None:
            y = y + bias * weight.bias.to(acc)
        return _into(out, y.to(x.dtype))

    return linear


register(
    "linear",
    [
        ("no-bias", "drops the bias", _linear(bias=0)),
        ("bias-twice", "adds the bias twice", _linear(bias=2)),
        ("weight-kn", "reads the (N, K) weight as (K, N)", _linear(weight_layout="kn")),
        (
            "acc-bf16",
            "accumulates the dot products in the activation dtype (bf16), 8 terms at a time",
            _linear(acc_in_dtype=True),
            BF16_ONLY,
        ),
        ("w4-nibble-order", "W4A16: high nibble first", _linear(nibbles="hi-lo")),
        ("w4-no-zero-point", "W4A16: zero points ignored", _linear(zeros=False)),
        (
            "group-scales-tiled",
            "group scales tiled along K instead of repeated per group",
            _linear(group_scales="tile"),
        ),
        (
            "first-group-scale",
            "the first group's scale for all of K",
            _linear(group_scales="first"),
        ),
        (
            "w8a8-tensor-scale",
            "W8A8: one activation scale for the whole batch, not one per token",
            _linear(act_scale="tensor"),
        ),
        (
            "w8a8-truncate",
            "W8A8: activations quantized by truncation instead of rounding",
            _linear(act_round="trunc"),
        ),
    ],
)

# -------------------------------------------------------------------------------------------
# norms
# -------------------------------------------------------------------------------------------


def _rms_norm(
    *,
    eps_inside: bool = True,
    residual_add: bool = True,
    norm_of: str = "s",
    divisor_shift: int = 0,
    round_s: bool = True,
    round_normed: bool = True,
    acc_in_dtype: bool = False,
    dim: int = -1,
    writes_x: bool = False,
) -> Method:
    """The reference rms_norm, with one knob turned: eps outside the square root, the
    residual not added, the norm of x instead of s, the mean's divisor off, the sum s or the
    normalized value not rounded, the sum of squares accumulated in x's dtype, the mean over
    tokens, s written into x."""

    def rms_norm(
        self: TorchBackend,
        x: Any,
        weight: Any,
        eps: float,
        residual: Any = None,
        out: Any = None,
    ) -> Any:
        if residual is None:
            s = x
            s_acc = _acc(x)
        else:
            s_acc = _acc(x) + (_acc(residual) if residual_add else 0)
            s = s_acc.to(x.dtype)
            if round_s:
                s_acc = _acc(s)
            if writes_x:
                x.copy_(s)
        sf = _acc(x) if norm_of == "x" else s_acc
        n = sf.shape[dim] + divisor_shift
        if acc_in_dtype:
            mean = (_accumulate(sf.pow(2), x.dtype).to(sf.dtype) / n).unsqueeze(-1)
        else:
            mean = sf.pow(2).sum(dim=dim, keepdim=True) / n
        normed = sf * torch.rsqrt(mean + eps) if eps_inside else sf / (mean.sqrt() + eps)
        if round_normed:
            normed = normed.to(x.dtype)
        y = _into(out, (_acc(normed) * _acc(weight)).to(x.dtype))
        return y, (None if residual is None else s)

    return rms_norm


register(
    "rms_norm",
    [
        ("eps-outside-sqrt", "x / (sqrt(mean x^2) + eps)", _rms_norm(eps_inside=False)),
        ("no-residual", "the residual is not added", _rms_norm(residual_add=False)),
        ("norm-of-x", "normalizes x, not s = x + residual", _rms_norm(norm_of="x")),
        ("divisor-n-1", "mean of squares over n - 1", _rms_norm(divisor_shift=-1)),
        (
            "acc-bf16",
            "accumulates the sum of squares in bf16",
            _rms_norm(acc_in_dtype=True),
            BF16_ONLY,
        ),
        ("over-tokens", "the mean over tokens instead of features", _rms_norm(dim=0)),
        ("input-as-contiguous", "a strided x read as if contiguous", _as_contiguous(_rms_norm())),
        ("writes-x", "stores s = x + residual into x", _rms_norm(writes_x=True)),
        (
            "unrounded-s",
            "normalizes the fp32 sum s, not s rounded to x's dtype",
            _rms_norm(round_s=False),
            BF16_ONLY
            | equivalent("s differs by one rounding (u relative): within the norm class's bound"),
        ),
        (
            "one-rounding",
            "multiplies by the weight before rounding (the Llama convention rounds first)",
            _rms_norm(round_normed=False),
            BF16_ONLY
            | equivalent(
                "one rounding fewer, at most u relative: the float64 oracle rounds neither"
            ),
        ),
    ],
)


def _gemma_rms_norm(
    *,
    one_plus: bool = True,
    eps_inside: bool = True,
    residual_add: bool = True,
    norm_of: str = "s",
    dim: int = -1,
    writes_x: bool = False,
    round_normed: bool = False,
    offset_in_dtype: bool = False,
) -> Method:
    """The reference gemma_rms_norm, with one knob turned: the weight used as it is (the
    rms_norm convention, no 1 +), eps outside the square root, the residual not added, the norm
    of x instead of s, the mean over tokens, s written into x, the normalized value rounded
    before the weight (as rms_norm does), or 1 + w rounded to x's dtype."""

    def gemma_rms_norm(
        self: TorchBackend,
        x: Any,
        weight: Any,
        eps: float,
        residual: Any = None,
        out: Any = None,
    ) -> Any:
        s = x
        if residual is not None:
            s = (_acc(x) + (_acc(residual) if residual_add else 0)).to(x.dtype)
            if writes_x:
                x.copy_(s)
        sf = _acc(x) if norm_of == "x" else _acc(s)
        mean = sf.pow(2).mean(dim=dim, keepdim=True)
        normed = sf * torch.rsqrt(mean + eps) if eps_inside else sf / (mean.sqrt() + eps)
        if round_normed:
            normed = _acc(normed.to(x.dtype))
        w = _acc(weight).to(sf.dtype)
        gain = 1.0 + w if one_plus else w
        if offset_in_dtype:
            gain = _acc(gain.to(x.dtype))
        y = _into(out, (normed * gain).to(x.dtype))
        return y, (None if residual is None else s)

    return gemma_rms_norm


register(
    "gemma_rms_norm",
    [
        ("weight-without-one", "multiplies by w, not 1 + w", _gemma_rms_norm(one_plus=False)),
        ("eps-outside-sqrt", "x / (sqrt(mean x^2) + eps)", _gemma_rms_norm(eps_inside=False)),
        ("no-residual", "the residual is not added", _gemma_rms_norm(residual_add=False)),
        ("norm-of-x", "normalizes x, not s = x + residual", _gemma_rms_norm(norm_of="x")),
        ("over-tokens", "the mean over tokens instead of features", _gemma_rms_norm(dim=0)),
        (
            "input-as-contiguous",
            "a strided x read as if contiguous",
            _as_contiguous(_gemma_rms_norm()),
        ),
        ("writes-x", "stores s = x + residual into x", _gemma_rms_norm(writes_x=True)),
        (
            "llama-rounding",
            "rounds the normalized value to x's dtype before the weight (rms_norm's convention)",
            _gemma_rms_norm(round_normed=True),
            BF16_ONLY,
        ),
        (
            "offset-in-dtype",
            "1 + w rounded to x's dtype",
            _gemma_rms_norm(offset_in_dtype=True),
            BF16_ONLY | equivalent("one unbiased rounding of the gain, at most u relative"),
        ),
    ],
)


def _layer_norm(
    *,
    unbiased: bool = False,
    center: bool = True,
    bias: bool = True,
    eps_inside: bool = True,
    swap: bool = False,
) -> Method:
    def layer_norm(
        self: TorchBackend, x: Any, weight: Any, b: Any, eps: float, out: Any = None
    ) -> Any:
        xf = _acc(x)
        mean = xf.mean(dim=-1, keepdim=True) if center else torch.zeros_like(xf[..., :1])
        if center:
            var = xf.var(dim=-1, keepdim=True, correction=1 if unbiased else 0)
        else:
            var = xf.pow(2).mean(dim=-1, keepdim=True)
        if eps_inside:
            y = (xf - mean) / torch.sqrt(var + eps)
        else:
            y = (xf - mean) / (torch.sqrt(var) + eps)
        w, bb = _acc(weight), (None if b is None else _acc(b))
        if swap and bb is not None:
            w, bb = bb, w
        y = y * w
        if bb is not None and bias:
            y = y + bb
        return _into(out, y.to(x.dtype))

    return layer_norm


register(
    "layer_norm",
    [
        ("unbiased-var", "variance over n - 1", _layer_norm(unbiased=True)),
        ("no-centering", "does not subtract the mean", _layer_norm(center=False)),
        ("no-bias", "drops the bias", _layer_norm(bias=False)),
        ("eps-outside-sqrt", "(x - mean) / (std + eps)", _layer_norm(eps_inside=False)),
        ("weight-bias-swapped", "weight and bias swapped", _layer_norm(swap=True)),
    ],
)

# -------------------------------------------------------------------------------------------
# rotary embedding and the KV-cache write
# -------------------------------------------------------------------------------------------


def _rotary(
    *,
    style: str = "as-asked",
    sin_sign: float = 1.0,
    halves: str = "cos-sin",
    position_shift: int = 0,
    rotate: str = "qk",
    head_view: str = "head_size",
    low_precision: bool = False,
) -> Method:
    def rotary_embedding(
        self: TorchBackend,
        positions: Any,
        q: Any,
        k: Any,
        cos_sin_cache: Any,
        head_size: int,
        is_neox_style: bool,
    ) -> Any:
        pos = (positions.long() + position_shift).clamp(0, cos_sin_cache.shape[0] - 1)
        cs = cos_sin_cache[pos]
        rot = cs.shape[-1]
        cos, sin = cs[:, : rot // 2], cs[:, rot // 2 :]
        if halves == "sin-cos":
            cos, sin = sin, cos
        neox = is_neox_style if style == "as-asked" else not is_neox_style
        width = head_size if head_view == "head_size" else rot
        for x in (q, k) if rotate == "qk" else (q,):
            heads = x.view(x.shape[0], -1, width)
            part = heads[..., :rot] if low_precision else _acc(heads[..., :rot])
            c = cos.to(part.dtype).unsqueeze(1)
            s = sin_sign * sin.to(part.dtype).unsqueeze(1)
            if neox:
                a, b = part[..., : rot // 2], part[..., rot // 2 :]
                rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
            else:
                a, b = part[..., 0::2], part[..., 1::2]
                rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
            heads[..., :rot] = rotated.to(x.dtype)
        return q, k

    return rotary_embedding


register(
    "rotary_embedding",
    [
        ("style-swapped", "neox and GPT-J pairings swapped", _rotary(style="other")),
        ("sin-sign", "rotates the other way (sin negated)", _rotary(sin_sign=-1.0)),
        ("cos-sin-swapped", "reads sin as cos", _rotary(halves="sin-cos")),
        ("position-plus-one", "the angle of position + 1", _rotary(position_shift=1)),
        ("q-only", "rotates q but not k", _rotary(rotate="q")),
        (
            "rotary-dim-as-head",
            "splits heads by the rotary dimension, not the head size",
            _rotary(head_view="rotary_dim"),
        ),
        (
            "low-precision",
            "rotates in bf16 (cos and sin rounded, each product rounded)",
            _rotary(low_precision=True),
            BF16_ONLY,
        ),
    ],
)


def _cache_write(
    *, slot_shift: int = 0, skip_pads: bool = True, swap: bool = False, heads: str = "all"
) -> Method:
    def reshape_and_cache(
        self: TorchBackend, key: Any, value: Any, key_cache: Any, value_cache: Any, meta: Any
    ) -> None:
        slots = torch.from_numpy(meta.slot_mapping).clone()
        keep = slots >= 0 if skip_pads else torch.ones_like(slots, dtype=torch.bool)
        slots = slots[keep] + slot_shift
        num_blocks, block_size, hkv, d = key_cache.shape
        k_flat = key_cache.view(num_blocks * block_size, hkv, d)
        v_flat = value_cache.view(num_blocks * block_size, hkv, d)
        if swap:
            k_flat, v_flat = v_flat, k_flat
        n = hkv if heads == "all" else 1
        slots = slots.clamp(max=num_blocks * block_size - 1)
        k_flat[slots, :n] = key[keep].reshape(-1, hkv, d)[:, :n].to(key_cache.dtype)
        v_flat[slots, :n] = value[keep].reshape(-1, hkv, d)[:, :n].to(value_cache.dtype)

    return reshape_and_cache


register(
    "reshape_and_cache",
    [
        ("slot-plus-one", "writes slot + 1", _cache_write(slot_shift=1)),
        (
            "pads-written",
            "writes padding tokens (slot -1) into the last slot",
            _cache_write(skip_pads=False),
        ),
        ("key-value-swapped", "keys into the value cache", _cache_write(swap=True)),
        ("first-head", "writes the first KV head only", _cache_write(heads="one")),
    ],
)

# -------------------------------------------------------------------------------------------
# paged attention
# -------------------------------------------------------------------------------------------


def _attention(
    *,
    causal_shift: int = 0,
    causal: bool = True,
    head_map: str = "div",
    scale_power: int = 1,
    cap: str = "tanh",
    window_shift: int = 0,
    window: bool = True,
    block_shift: int = 0,
    length_shift: int = 0,
    values: str = "value",
    subtract_max: bool = True,
    positions: str = "end",
    round_scores: bool = False,
    query_layout: str = "view",
    acc_in_dtype: bool = False,
) -> Method:
    """The reference attention (prefill and decode), with one knob turned: the causal mask
    shifted or absent, the GQA head map ``h % Hkv``, the scale squared or dropped, the soft cap
    dropped or a clamp, the window shifted or ignored, the block table read one entry late, the
    context one key short, values read from the key cache, exp() without the maximum, query
    positions counted from 0 (the cached prefix ignored), scores rounded to the activation
    dtype, the query read as if contiguous, the weighted sum of values accumulated in the
    activation dtype."""

    def attend(
        self: TorchBackend,
        query: Any,
        key_cache: Any,
        value_cache: Any,
        meta: Any,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Any = None,
    ) -> Any:
        hkv, d = key_cache.shape[2], key_cache.shape[3]
        if query_layout == "storage":
            rows, width = query.shape
            query = torch.as_strided(query, (rows, width), (width, 1), query.storage_offset())
        q_all = query.reshape(query.shape[0], -1, d)  # (T, Hq, D)
        hq = q_all.shape[1]
        acc = _acc_dtype(query.dtype)
        heads = torch.arange(hq)
        kv_of = heads % hkv if head_map == "mod" else heads // (hq // hkv)
        result = torch.empty(q_all.shape, dtype=query.dtype)
        starts = meta.query_start_loc
        for b in range(meta.num_seqs):
            q0, q1 = int(starts[b]), int(starts[b + 1])
            if q1 == q0:
                continue
            length = int(meta.seq_lens[b])
            table = meta.block_tables[b][block_shift:]
            keys = max(1, length + length_shift)
            v_source = key_cache if values == "key" else value_cache
            k = self._gather_context(key_cache, table, keys).to(acc)[:, kv_of]  # (L, Hq, D)
            v = self._gather_context(v_source, table, keys).to(acc)[:, kv_of]
            q = q_all[q0:q1].to(acc)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale**scale_power
            if round_scores:
                scores = scores.to(query.dtype).to(acc)
            if logits_soft_cap and cap == "tanh":
                scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
            elif logits_soft_cap and cap == "clamp":
                scores = scores.clamp(-logits_soft_cap, logits_soft_cap)
            n = q1 - q0
            first = length - n if positions == "end" else 0
            q_pos = torch.arange(first, first + n).unsqueeze(1)
            k_pos = torch.arange(keys).unsqueeze(0)
            allowed = k_pos <= q_pos + causal_shift if causal else k_pos >= 0
            if sliding_window and window:
                allowed = allowed & (k_pos > q_pos - sliding_window - window_shift)
            if subtract_max:
                probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            else:
                e = torch.exp(scores).masked_fill(~allowed, 0.0)
                probs = e / e.sum(dim=-1, keepdim=True)
            if acc_in_dtype:  # 16 keys at a time, the running sum rounded after each
                vh = v.permute(1, 0, 2)  # (Hq, L, D)
                o = torch.zeros((hq, n, d), dtype=query.dtype)
                for k0 in range(0, keys, 16):
                    part = probs[..., k0 : k0 + 16] @ vh[:, k0 : k0 + 16]
                    o = (o.to(acc) + part).to(query.dtype)
                result[q0:q1] = o.transpose(0, 1)
            else:
                result[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        return _into(out, result.reshape(query.shape[0], hq * d))

    return attend


_NO_LATER_KEY = equivalent("a decode query is its sequence's last token: no later key exists")


def _attention_rows(decode: bool) -> list[Row]:
    later_key = (_NO_LATER_KEY,) if decode else ()
    return [
        (
            "causal-off-by-one",
            "each token also sees the next",
            _attention(causal_shift=1),
            *later_key,
        ),
        ("no-causal-mask", "every key is visible", _attention(causal=False), *later_key),
        ("gqa-head-mod", "query head h reads KV head h % Hkv", _attention(head_map="mod")),
        ("scale-squared", "scores scaled twice", _attention(scale_power=2)),
        ("no-scale", "scores not scaled", _attention(scale_power=0)),
        ("no-soft-cap", "the soft cap ignored", _attention(cap="none")),
        ("cap-as-clamp", "the soft cap as a clamp, not tanh", _attention(cap="clamp")),
        ("window-off-by-one", "the window lets one more key in", _attention(window_shift=1)),
        ("no-window", "the sliding window ignored", _attention(window=False)),
        ("table-one-late", "block-table entries read one late", _attention(block_shift=1)),
        ("one-key-short", "the context's last key left out", _attention(length_shift=-1)),
        ("values-from-keys", "values read from the key cache", _attention(values="key")),
        ("exp-without-max", "exp(score) without the maximum", _attention(subtract_max=False)),
        ("positions-from-zero", "the cached prefix ignored", _attention(positions="start")),
        ("query-as-contiguous", "a strided query read packed", _attention(query_layout="storage")),
        ("scores-rounded", "scores rounded to bf16", _attention(round_scores=True), BF16_ONLY),
        ("acc-bf16", "P @ V accumulated in bf16", _attention(acc_in_dtype=True), BF16_ONLY),
    ]


register("paged_attention_prefill", _attention_rows(decode=False))
register("paged_attention_decode", _attention_rows(decode=True))

# -------------------------------------------------------------------------------------------
# activations, add, gather
# -------------------------------------------------------------------------------------------


def _gated(act: Callable[[torch.Tensor], torch.Tensor], *, order: str = "gate-up") -> Method:
    def gated(self: TorchBackend, x: Any, out: Any = None) -> Any:
        xf = _acc(x)
        if order == "interleaved":
            gate, up = xf[..., 0::2], xf[..., 1::2]
        else:
            gate, up = xf.chunk(2, dim=-1)
            if order == "up-gate":
                gate, up = up, gate
        return _into(out, (act(gate) * up).to(x.dtype))

    return gated


def _silu_op_by_op(self: TorchBackend, x: Any, out: Any = None) -> Any:
    gate, up = x.chunk(2, dim=-1)  # every step below rounds to x's dtype
    silu = gate / (torch.ones((), dtype=x.dtype) + torch.exp(-gate))
    return _into(out, silu * up)


register(
    "silu_and_mul",
    [
        ("halves-swapped", "silu(up) * gate", _gated(F.silu, order="up-gate")),
        ("sigmoid", "sigmoid(gate) * up (the x of x*sigmoid(x) dropped)", _gated(torch.sigmoid)),
        ("gelu", "gelu instead of silu", _gated(F.gelu)),
        ("interleaved", "gate and up read interleaved", _gated(F.silu, order="interleaved")),
        (
            "input-as-contiguous",
            "a strided input read as if contiguous",
            _as_contiguous(_gated(F.silu)),
        ),
        (
            "op-by-op",
            "gate / (1 + exp(-gate)) * up with every step rounded to x's dtype",
            _silu_op_by_op,
            equivalent(
                "four roundings to bf16 instead of one stay within the elementwise bound, NMSE "
                "floor and bias cap (on inputs of scale 0.01 to 100: NMSE <= 0.8 u^2, bias "
                "<= 0.13 u): a precision the table does not separate"
            ),
        ),
    ],
)


def _gelu_and_mul(*, force: str = "", order: str = "gate-up") -> Method:
    def gelu_and_mul(self: TorchBackend, x: Any, approximate: str = "none", out: Any = None) -> Any:
        gate, up = _acc(x).chunk(2, dim=-1)
        if order == "up-gate":
            gate, up = up, gate
        y = F.gelu(gate, approximate=force or approximate) * up
        return _into(out, y.to(x.dtype))

    return gelu_and_mul


register(
    "gelu_and_mul",
    [
        ("always-erf", "ignores approximate='tanh'", _gelu_and_mul(force="none")),
        ("always-tanh", "always the tanh approximation", _gelu_and_mul(force="tanh")),
        ("halves-swapped", "gelu(up) * gate", _gelu_and_mul(order="up-gate")),
    ],
)


def _gelu_sigmoid(self: TorchBackend, x: Any, approximate: str = "none", out: Any = None) -> Any:
    xf = _acc(x)
    return _into(out, (xf * torch.sigmoid(1.702 * xf)).to(x.dtype))


register(
    "gelu",
    [
        (
            "always-erf",
            "ignores approximate='tanh'",
            lambda self, x, approximate="none", out=None: _into(out, F.gelu(_acc(x)).to(x.dtype)),
        ),
        ("sigmoid-approx", "x * sigmoid(1.702 x)", _gelu_sigmoid),
        (
            "silu",
            "silu instead of gelu",
            lambda self, x, approximate="none", out=None: _into(out, F.silu(_acc(x)).to(x.dtype)),
        ),
    ],
)


def _add_in_place(self: TorchBackend, a: Any, b: Any, out: Any = None) -> Any:
    return _into(out, a.add_(b))


def _add_one_past(self: TorchBackend, a: Any, b: Any, out: Any = None) -> Any:
    y = TorchBackend.add(self, a, b, out)
    if out is not None:
        rows, n = out.shape
        torch.as_strided(out, (rows, n + 1), out.stride(), out.storage_offset())[:, n] = 0
    return y


register(
    "add",
    [
        ("subtract", "a - b", lambda self, a, b, out=None: _into(out, a - b)),
        (
            "input-as-contiguous",
            "a strided a read as if contiguous",
            _as_contiguous(lambda self, a, b, out=None: TorchBackend.add(self, a, b, out)),
        ),
        ("drops-b", "returns a", lambda self, a, b, out=None: _into(out, a.clone())),
        ("a-plus-a", "a + a", lambda self, a, b, out=None: _into(out, a + a)),
        ("in-place", "adds into a", _add_in_place),
        ("one-past", "writes one element past each row of out", _add_one_past),
        (
            "in-dtype",
            "adds in bf16 directly",
            lambda self, a, b, out=None: _into(out, a + b),
            BF16_ONLY
            | equivalent("torch rounds the exact sum of two bf16 values once: the same bits"),
        ),
    ],
)


def _scale(*, round_factor: bool = True, power: int = 1, divide: bool = False) -> Method:
    def scale(self: TorchBackend, x: Any, factor: float, out: Any = None) -> Any:
        f = dtype_rounded(factor, x.dtype) if round_factor else factor
        y = _acc(x) / f if divide else _acc(x) * f**power
        return _into(out, y.to(x.dtype))

    return scale


register(
    "scale",
    [
        (
            "factor-unrounded",
            "multiplies by the exact factor, not the factor rounded to x's dtype",
            _scale(round_factor=False),
            BF16_ONLY,
        ),
        ("squared", "x * factor^2", _scale(power=2)),
        ("ignores-factor", "returns x", _scale(power=0)),
        ("divides", "x / factor", _scale(divide=True)),
        ("input-as-contiguous", "a strided x read as if contiguous", _as_contiguous(_scale())),
    ],
)


def _soft_cap(*, form: str = "cap * tanh(x / cap)", check: bool = True) -> Method:
    def soft_cap(self: TorchBackend, x: Any, cap: float, out: Any = None) -> Any:
        if check and not cap > 0:
            raise ValueError(f"soft_cap needs a cap > 0, not {cap!r}")
        xf = _acc(x)
        forms = {
            "cap * tanh(x / cap)": lambda: cap * torch.tanh(xf / cap),
            "clamp": lambda: xf.clamp(-cap, cap),
            "x": lambda: xf,
            "tanh(x / cap)": lambda: torch.tanh(xf / cap),
            "cap * tanh(x)": lambda: cap * torch.tanh(xf),
        }
        return _into(out, forms[form]().to(x.dtype))

    return soft_cap


register(
    "soft_cap",
    [
        ("clamp", "clamps x to [-cap, cap] instead of tanh", _soft_cap(form="clamp")),
        ("no-cap", "returns x", _soft_cap(form="x")),
        ("unscaled", "tanh(x / cap), not multiplied back by cap", _soft_cap(form="tanh(x / cap)")),
        ("tanh-of-x", "cap * tanh(x), x not divided by cap", _soft_cap(form="cap * tanh(x)")),
        (
            "any-cap",
            "computes with a cap <= 0 instead of raising ValueError",
            _soft_cap(check=False),
        ),
        ("input-as-contiguous", "a strided x read as if contiguous", _as_contiguous(_soft_cap())),
    ],
)


def _gather(shift: int = 0, clamp_top: int = 0, reverse: bool = False) -> Method:
    def gather_rows(self: TorchBackend, x: Any, indices: Any, out: Any = None) -> Any:
        idx = (indices.long() + shift).clamp(0, x.shape[0] - 1 - clamp_top)
        if reverse:
            idx = idx.flip(0)
        return _into(out, x.index_select(0, idx))

    return gather_rows


register(
    "gather_rows",
    [
        ("index-plus-one", "row index + 1", _gather(shift=1)),
        ("last-row", "never the last row (clamps to T - 2)", _gather(clamp_top=1)),
        ("reversed", "rows in reverse order", _gather(reverse=True)),
    ],
)

# -------------------------------------------------------------------------------------------
# logits processing
# -------------------------------------------------------------------------------------------


def _penalties(
    *,
    repetition: str = "sign",
    seen: str = "prompt+output",
    frequency_counts: str = "output",
    presence: str = "once",
    presence_sign: float = 1.0,
    pads: str = "skip",
    order: str = "repetition-first",
    row_params: str = "own",
) -> Method:
    """The reference penalties, with one knob turned: repetition always divides, or inverts
    the sign rule, or hits every token; prompt tokens not seen; frequency counting the prompt;
    presence from two occurrences, or added; pads counted as token 0; frequency and presence
    before repetition; row 0's parameters for every row."""

    def counts(ids: np.ndarray, vocab: int) -> torch.Tensor:
        t = torch.from_numpy(ids)
        fill = 0 if pads == "as-zero" else vocab
        c = torch.zeros((t.shape[0], vocab + 1), dtype=torch.int64)
        c.scatter_add_(1, torch.where(t < 0, fill, t), torch.ones_like(t))
        return c[:, :vocab]

    def apply_penalties(self: TorchBackend, logits: Any, meta: Any) -> Any:
        vocab = logits.shape[1]
        dt = logits.dtype
        out_counts = counts(meta.output_ids, vocab).to(dt)
        prompt_counts = counts(meta.prompt_ids, vocab).to(dt)
        was_seen = out_counts > 0
        if seen == "prompt+output":
            was_seen = was_seen | (prompt_counts > 0)
        elif seen == "all":
            was_seen = torch.ones_like(was_seen)

        def param(values: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(values).to(dt).unsqueeze(1)
            return t[:1].expand_as(t) if row_params == "first" else t

        rep, freq, pres = param(meta.repetition), param(meta.frequency), param(meta.presence)
        freq_counts = out_counts + (prompt_counts if frequency_counts == "all" else 0)
        present = (out_counts > (1 if presence == "twice" else 0)).to(dt)

        def repeat(x: torch.Tensor) -> torch.Tensor:
            if repetition == "divide":
                penalized = x / rep
            elif repetition == "inverted":
                penalized = torch.where(x > 0, x * rep, x / rep)
            else:
                penalized = torch.where(x > 0, x / rep, x * rep)
            return torch.where(was_seen, penalized, x)

        def subtract(x: torch.Tensor) -> torch.Tensor:
            return x - (freq * freq_counts + presence_sign * pres * present)

        result = (
            subtract(repeat(logits)) if order == "repetition-first" else repeat(subtract(logits))
        )
        logits.copy_(result)
        return logits

    return apply_penalties


register(
    "apply_penalties",
    [
        ("repetition-divides", "repetition divides negatives too", _penalties(repetition="divide")),
        (
            "repetition-inverted",
            "repetition multiplies positives",
            _penalties(repetition="inverted"),
        ),
        ("repetition-everywhere", "repetition on unseen tokens too", _penalties(seen="all")),
        ("prompt-unseen", "prompt tokens do not count as seen", _penalties(seen="output")),
        (
            "frequency-counts-prompt",
            "frequency counts the prompt",
            _penalties(frequency_counts="all"),
        ),
        ("presence-twice", "presence needs two occurrences", _penalties(presence="twice")),
        ("presence-added", "presence added, not subtracted", _penalties(presence_sign=-1.0)),
        ("pads-as-token-0", "pad ids (-1) counted as token 0", _penalties(pads="as-zero")),
        ("subtract-first", "frequency, presence before repetition", _penalties(order="subtract")),
        ("row-0-params", "row 0's penalties for every row", _penalties(row_params="first")),
    ],
)


def _repetition_ge(self: TorchBackend, logits: Any, meta: Any) -> Any:
    vocab = logits.shape[1]
    out_counts = self._counts(meta.output_ids, vocab, logits.device).to(logits.dtype)
    seen = (self._counts(meta.prompt_ids, vocab, logits.device) > 0) | (out_counts > 0)
    rep = torch.from_numpy(meta.repetition).to(logits.dtype).unsqueeze(1)
    logits.copy_(torch.where(seen, torch.where(logits >= 0, logits / rep, logits * rep), logits))
    freq = torch.from_numpy(meta.frequency).to(logits.dtype).unsqueeze(1)
    pres = torch.from_numpy(meta.presence).to(logits.dtype).unsqueeze(1)
    logits -= freq * out_counts + pres * (out_counts > 0).to(logits.dtype)
    return logits


register(
    "apply_penalties",
    [
        (
            "zero-is-positive",
            "logits >= 0 take the division branch",
            _repetition_ge,
            equivalent("at a logit of 0 both branches give 0"),
        ),
    ],
)


def _bans(
    *, pads: str = "skip", shift: int = 0, value: float = float("-inf"), rows: str = "own"
) -> Method:
    def apply_token_bans(self: TorchBackend, logits: Any, banned: Any) -> Any:
        ids = banned[:1].expand_as(banned) if rows == "first" else banned
        mask = ids >= 0 if pads == "skip" else torch.ones_like(ids, dtype=torch.bool)
        r, c = torch.nonzero(mask, as_tuple=True)
        cols = (ids[r, c].long() + shift).clamp(max=logits.shape[1] - 1)
        logits[r, cols] = value
        return logits

    return apply_token_bans


register(
    "apply_token_bans",
    [
        ("pads-ban-last", "pad ids (-1) ban the last token", _bans(pads="all")),
        ("id-plus-one", "bans id + 1", _bans(shift=1)),
        ("large-negative", "-1e9 instead of -inf", _bans(value=-1e9)),
        ("row-0-bans", "row 0's bans for every row", _bans(rows="first")),
    ],
)


def _bitmask(*, bit_order: str = "lsb", invert: bool = False, value: float = float("-inf"),
             rows: str = "own") -> Method:  # fmt: skip
    def apply_token_bitmask(self: TorchBackend, logits: Any, bitmask: Any) -> Any:
        n_rows, vocab = logits.shape
        words = bitmask.to(torch.int32)
        if rows == "first":
            words = words[:1].expand_as(words)
        shifts = torch.arange(32, dtype=torch.int32)
        if bit_order == "msb":
            shifts = 31 - shifts
        if bit_order == "signed":
            bits = (words.unsqueeze(-1) & (1 << shifts)) > 0
        else:
            bits = ((words.unsqueeze(-1) >> shifts) & 1).bool()
        allowed = bits.reshape(n_rows, -1)[:, :vocab]
        if invert:
            allowed = ~allowed
        logits.masked_fill_(~allowed, value)
        return logits

    return apply_token_bitmask


register(
    "apply_token_bitmask",
    [
        ("msb-first", "bit 31 - t % 32", _bitmask(bit_order="msb")),
        ("signed-test", "(word & 1 << k) > 0 in int32", _bitmask(bit_order="signed")),
        ("inverted", "bans the allowed tokens", _bitmask(invert=True)),
        ("large-negative", "-1e30 instead of -inf", _bitmask(value=-1e30)),
        ("row-0-mask", "row 0's mask for every row", _bitmask(rows="first")),
    ],
)

# -------------------------------------------------------------------------------------------
# sampling
# -------------------------------------------------------------------------------------------


def _softmax(x: torch.Tensor, subtract_max: bool) -> torch.Tensor:
    if subtract_max:
        return torch.softmax(x, dim=-1)
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


def _filtered_probs(
    *,
    temperature: str = "divide",
    k_shift: int = 0,
    k_ties: bool = True,
    top_k_on: str = "logits",
    p_rule: str = "before",
    p_on: str = "top-k",
    min_p_ref: str = "max",
    min_p_shift: int = 0,
    order: str = "k,p,min",
    subtract_max: bool = True,
    renormalize: bool = True,
) -> Method:
    """The reference filter, with one knob turned. temperature: multiplied, or applied after
    the filters; top-k: k shifted, ties at the k-th dropped, applied to probabilities; top-p:
    the crossing token dropped (``"including"``) or one more kept (``"one-more"``), computed
    on the distribution before top-k; min-p: against the sum instead of the maximum, one token
    more or fewer, applied before top-p; exp() without the maximum; no renormalization."""

    def filtered_probs(self: TorchBackend, logits: Any, meta: Any) -> Any:
        acc = _acc_dtype(logits.dtype)
        raw = logits.to(acc)
        temp = torch.from_numpy(meta.temperature).to(acc).unsqueeze(1)
        greedy = temp == 0
        t = torch.where(greedy, torch.ones_like(temp), temp)
        x = raw * t if temperature == "multiply" else raw / t
        f = raw if temperature == "after" else x  # what the filters decide on
        vocab = x.shape[1]
        sorted_f, order_ids = f.sort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order_ids).scatter(
            1, order_ids, torch.arange(vocab).expand_as(order_ids).contiguous()
        )
        top_k = torch.from_numpy(meta.top_k).long()
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        if k_ties:
            index = (k - 1 + k_shift).clamp(0, vocab - 1).unsqueeze(1)
            keep = f >= sorted_f.gather(1, index)
        else:
            keep = rank < k.unsqueeze(1)
        if top_k_on == "probs":  # the same set, chosen after the softmax
            p_all = _softmax(f, subtract_max)
            keep = p_all >= p_all.gather(1, order_ids).gather(1, (k - 1).unsqueeze(1))
        probs = _softmax(f.masked_fill(~keep, float("-inf")), subtract_max)

        def min_p_keep(p: torch.Tensor) -> torch.Tensor:
            min_p = torch.from_numpy(meta.min_p).to(acc).unsqueeze(1)
            ref = p.sum(-1, keepdim=True) if min_p_ref == "sum" else p.amax(-1, keepdim=True)
            kept = p >= min_p * ref
            if min_p_shift:
                n = kept.sum(dim=-1, keepdim=True)
                n = torch.where(min_p > 0, (n + min_p_shift).clamp(min=1), n)
                kept = rank < n
            return kept

        def top_p_keep(p: torch.Tensor) -> torch.Tensor:
            top_p = torch.from_numpy(meta.top_p).to(acc).unsqueeze(1)
            sorted_p = p.gather(1, order_ids)
            cumulative = sorted_p.cumsum(dim=-1)
            before = cumulative if p_rule == "including" else cumulative - sorted_p
            drop = before >= top_p
            if p_rule == "one-more":
                drop = torch.cat([torch.zeros_like(drop[:, :1]), drop[:, :-1]], dim=1)
            drop[:, 0] = False
            return ~torch.zeros_like(drop).scatter(1, order_ids, drop)

        p_source = _softmax(f, subtract_max) if p_on == "all" else probs
        if order == "k,p,min":
            keep = keep & top_p_keep(p_source)
            keep = keep & min_p_keep(probs.masked_fill(~keep, 0.0))
        else:  # min-p, then top-p on what min-p left
            keep = keep & min_p_keep(probs)
            renormed = probs.masked_fill(~keep, 0.0)
            keep = keep & top_p_keep(renormed / renormed.sum(-1, keepdim=True))
        final = _softmax(x.masked_fill(~keep, float("-inf")), subtract_max)
        if not renormalize:
            final = final * probs.sum(-1, keepdim=True).clamp(max=1) * 0.5
        one_hot = F.one_hot(logits.argmax(dim=-1), vocab).to(acc)
        return torch.where(greedy, one_hot, final)

    return filtered_probs


register(
    "sample",
    [
        ("temperature-multiplies", "logits times T", _filtered_probs(temperature="multiply")),
        ("temperature-after", "filters on untempered logits", _filtered_probs(temperature="after")),
        ("top-k-keeps-k-1", "the k-th largest at index k - 2", _filtered_probs(k_shift=-1)),
        ("top-k-keeps-k+1", "the k-th largest at index k", _filtered_probs(k_shift=1)),
        (
            "top-k-drops-ties",
            "exactly k: ties with the k-th dropped",
            _filtered_probs(k_ties=False),
        ),
        (
            "top-k-on-probs",
            "top-k chosen on probabilities",
            _filtered_probs(top_k_on="probs"),
            equivalent("softmax is monotonic: the same k tokens"),
        ),
        ("top-p-drops-crossing", "the crossing token dropped", _filtered_probs(p_rule="including")),
        ("top-p-one-more", "one past the crossing kept", _filtered_probs(p_rule="one-more")),
        ("top-p-before-top-k", "top-p's masses from before top-k", _filtered_probs(p_on="all")),
        (
            "min-p-against-sum",
            "min_p times the total, not the max",
            _filtered_probs(min_p_ref="sum"),
        ),
        ("min-p-one-fewer", "min-p keeps one token fewer", _filtered_probs(min_p_shift=-1)),
        ("min-p-one-more", "min-p keeps one token more", _filtered_probs(min_p_shift=1)),
        ("min-p-before-top-p", "min-p applied before top-p", _filtered_probs(order="min,p")),
        ("exp-without-max", "softmax without the maximum", _filtered_probs(subtract_max=False)),
        (
            "no-renormalization",
            "kept probabilities not renormalized",
            _filtered_probs(renormalize=False),
            equivalent("the race argmax p / E is the same for any scale of a row"),
        ),
    ],
    on="filtered_probs",
)


def _sample(
    *, greedy: str = "argmax", ties: str = "low", race: str = "divide", seeds: str = "row"
) -> Method:
    """The reference ``sample``, with one knob turned: greedy rows drawn at temperature 1,
    greedy ties to the highest id, the race ``p * E`` instead of ``p / E``, one random stream
    for the whole batch (seeded by row 0)."""

    def sample(self: TorchBackend, logits: Any, meta: Any) -> Any:
        if ties == "high":
            flipped = logits.flip(-1).argmax(dim=-1)
            greedy_ids = logits.shape[-1] - 1 - flipped
        else:
            greedy_ids = logits.argmax(dim=-1)
        if meta.all_greedy and greedy == "argmax":
            return greedy_ids
        if greedy == "drawn":
            meta = type(meta)(
                temperature=np.where(meta.temperature == 0, 1.0, meta.temperature),
                top_k=meta.top_k,
                top_p=meta.top_p,
                min_p=meta.min_p,
                seeds=meta.seeds,
            )
        probs = self.filtered_probs(logits, meta)
        noise = torch.empty_like(probs)
        if seeds == "batch":
            gen = torch.Generator().manual_seed(int(meta.seeds[0]))
            noise.exponential_(generator=gen)
        else:
            for b in range(probs.shape[0]):
                gen = torch.Generator().manual_seed(int(meta.seeds[b]))
                noise[b].exponential_(generator=gen)
        drawn = (probs * noise if race == "multiply" else probs / noise).argmax(dim=-1)
        is_greedy = torch.from_numpy(meta.temperature == 0)
        return torch.where(is_greedy, greedy_ids, drawn)

    return sample


register(
    "sample",
    [
        ("greedy-drawn", "temperature 0 rows sampled at temperature 1", _sample(greedy="drawn")),
        ("greedy-ties-high", "greedy ties to the highest id", _sample(ties="high")),
        ("race-multiplies", "argmax p * E instead of p / E", _sample(race="multiply")),
        ("one-stream", "one random stream for the batch, seeded by row 0", _sample(seeds="batch")),
    ],
)


def _logprobs(
    *,
    normalize: str = "log_softmax",
    rank_rule: str = "greater",
    rank_base: int = 1,
    ties: str = "low",
    top_from: int = 0,
    token_shift: int = 0,
) -> Method:
    def compute_logprobs(self: TorchBackend, logits: Any, token_ids: Any, num_top: int) -> Any:
        x = _acc(logits)
        if normalize == "log_softmax":
            lp = torch.log_softmax(x, dim=-1)
        elif normalize == "log_of_softmax":
            lp = torch.log(torch.softmax(x, dim=-1))
        elif normalize == "over_rows":
            lp = torch.log_softmax(x, dim=0)
        else:
            lp = x
        ids = (token_ids.long() + token_shift) % x.shape[1]
        tok = lp.gather(1, ids.unsqueeze(1)).squeeze(1)
        above = lp >= tok.unsqueeze(1) if rank_rule == "greater-equal" else lp > tok.unsqueeze(1)
        ranks = above.sum(dim=-1) + rank_base
        if ties == "high":
            flipped = lp.flip(-1)
            vals, idx = flipped.sort(dim=-1, descending=True, stable=True)
            top_vals, top_ids = vals, x.shape[1] - 1 - idx
        else:
            top_vals, top_ids = lp.sort(dim=-1, descending=True, stable=True)
        top = slice(top_from, top_from + num_top)
        return LogprobsResult(tok, ranks, top_vals[:, top], top_ids[:, top])

    return compute_logprobs


register(
    "compute_logprobs",
    [
        (
            "log-of-softmax",
            "log(softmax(x)): -inf where softmax underflows",
            _logprobs(normalize="log_of_softmax"),
        ),
        ("raw-logits", "logits instead of log-probabilities", _logprobs(normalize="none")),
        ("over-rows", "normalized over the batch", _logprobs(normalize="over_rows")),
        (
            "rank-counts-self",
            "rank counts tokens >= the token",
            _logprobs(rank_rule="greater-equal"),
        ),
        ("rank-from-zero", "ranks start at 0", _logprobs(rank_base=0)),
        ("ties-high-id-first", "top ties: higher id first", _logprobs(ties="high")),
        ("top-skips-first", "the top list starts at the second", _logprobs(top_from=1)),
        ("token-plus-one", "the logprob of token id + 1", _logprobs(token_shift=1)),
    ],
)

# -------------------------------------------------------------------------------------------
# mixture of experts
# -------------------------------------------------------------------------------------------


def _route(*, scores: str = "softmax", renormalize: str = "as-asked", ids: str = "by-weight",
           in_dtype: bool = False) -> Method:  # fmt: skip
    def moe_route(self: TorchBackend, router_logits: Any, top_k: int, renormalize_: bool) -> Any:
        x = router_logits if in_dtype else _acc(router_logits)
        if scores == "topk-then-softmax":
            top, chosen = x.topk(top_k, dim=-1)
            weights = torch.softmax(top, dim=-1)
        else:
            probs = torch.sigmoid(x) if scores == "sigmoid" else torch.softmax(x, dim=-1)
            weights, chosen = probs.topk(top_k, dim=-1)
        norm = renormalize_ if renormalize == "as-asked" else renormalize == "always"
        if norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if ids == "by-id":
            chosen, order = chosen.sort(dim=-1)
            weights = weights.gather(1, order)
        return _acc(weights).float() if in_dtype else weights, chosen

    return moe_route


register(
    "moe_route",
    [
        (
            "topk-then-softmax",
            "softmax over the top-k logits only",
            _route(scores="topk-then-softmax"),
        ),
        ("sigmoid", "sigmoid instead of softmax", _route(scores="sigmoid")),
        ("never-renormalize", "renormalize ignored", _route(renormalize="never")),
        ("always-renormalize", "always renormalized", _route(renormalize="always")),
        ("ids-ascending", "experts sorted by id, not weight", _route(ids="by-id")),
        (
            "softmax-in-dtype",
            "softmax in the router's dtype (bf16), not fp32",
            _route(in_dtype=True),
            BF16_ONLY,
        ),
    ],
)


def _experts(*, order: str = "gate-up", weights: str = "own", act: str = "as-asked",
             w2_layout: str = "hi", expert_shift: int = 0) -> Method:  # fmt: skip
    def moe_experts(
        self: TorchBackend,
        x: Any,
        w13: Any,
        w2: Any,
        topk_weights: Any,
        topk_ids: Any,
        activation: str = "silu",
        out: Any = None,
    ) -> Any:
        acc = _acc_dtype(x.dtype)
        xf = x.to(acc)
        n_experts = w13.shape[0]
        result = torch.zeros(xf.shape, dtype=acc)
        ids = (topk_ids + expert_shift) % n_experts
        for e in ids.unique().tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            gate, up = (xf[tok] @ w13[e].to(acc).T).chunk(2, dim=-1)
            if order == "up-gate":
                gate, up = up, gate
            kind = activation if act == "as-asked" else "silu"
            a = F.silu(gate) if kind == "silu" else F.gelu(gate)
            w2e = w2[e].to(acc)
            if w2_layout == "ih":
                w2e = w2e.reshape(w2e.shape[1], w2e.shape[0]).T
            y = (a * up) @ w2e.T
            if weights == "own":
                scale = topk_weights[tok, slot].to(acc).unsqueeze(1)
            elif weights == "first":
                scale = topk_weights[tok, 0].to(acc).unsqueeze(1)
            else:
                scale = torch.ones((len(tok), 1), dtype=acc)
            result.index_add_(0, tok, y * scale)
        return _into(out, result.to(x.dtype))

    return moe_experts


register(
    "moe_experts",
    [
        ("halves-swapped", "act(up) * gate", _experts(order="up-gate")),
        ("unweighted", "routing weights ignored", _experts(weights="none")),
        ("first-weight", "the first slot's weight for every expert", _experts(weights="first")),
        ("always-silu", "activation ignored: always silu", _experts(act="silu")),
        ("w2-as-ih", "reads w2 (H, I) as (I, H)", _experts(w2_layout="ih")),
        ("expert-plus-one", "expert id + 1", _experts(expert_shift=1)),
    ],
)

# -------------------------------------------------------------------------------------------
# collectives
# -------------------------------------------------------------------------------------------

register(
    "all_reduce",
    [
        ("world-of-two", "sums as if over two ranks", lambda self, x: x.mul_(2)),
        (
            "zeroes",
            "returns zeros (a reduce into a fresh buffer)",
            lambda self, x: torch.zeros_like(x),
        ),
        (
            "not-in-place",
            "returns the sum in a new tensor, x untouched",
            lambda self, x: x.clone(),
            equivalent("with one process the sum is x: a new tensor and x hold the same values"),
        ),
    ],
)
register(
    "all_gather",
    [
        ("world-of-two", "gathers as if over two ranks", lambda self, x: torch.cat([x, x], dim=-1)),
        ("zeroes", "returns zeros", lambda self, x: torch.zeros_like(x)),
    ],
)
