"""EMULATION, not torch-npu: CPU stand-ins for the torch-npu operators the backend calls.

Each function follows its operator's documentation (torch-npu 2.13.0, ``torch_npu/
_op_plugin_docs.py``): the formula, the layouts the backend uses, and the documented input
constraints, which raise here as the device would refuse them (non-contiguous inputs, wrong
dtypes, block sizes the kernel does not take, ...). Registered as the CPU kernels of the
``npu`` operators (:func:`support.ascend_schemas.register`), they let the backend's own code
run on CPU tensors and be compared with the reference. What they prove is that the backend
lays out its inputs, masks and lengths as the docs say; what the NPU computes from them was
not run here. Internal precision is fp32 throughout; the hardware's may differ within the
conformance tolerances.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
#: c10::ScalarType numbers, as an ``int? output_dtype`` argument arrives.
_SCALAR_TYPES = {
    1: torch.int8,
    3: torch.int32,
    5: torch.float16,
    6: torch.float32,
    15: torch.bfloat16,
}
MASK_SIZE = 2048
T = TypeVar("T")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"[emulated npu] {message}")


def _given(value: T | None, message: str) -> T:
    if value is None:
        raise RuntimeError(f"[emulated npu] {message}")
    return value


# -------------------------------------------------------------------------------------------
# normalization and activation
# -------------------------------------------------------------------------------------------


def _rstd(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    return torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


def emulate_npu_rms_norm(
    self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x * rstd * gamma, rstd = 1 / sqrt(mean(x^2) + eps) over gamma's dimensions."""
    _require(self.dtype in FLOATS, f"npu_rms_norm takes fp16/bf16/fp32, not {self.dtype}")
    _require(gamma.dtype == self.dtype, "npu_rms_norm: gamma must have the input's dtype")
    x = self.float()
    rstd = _rstd(x, gamma, epsilon)
    return (x * rstd * gamma.float()).to(self.dtype), rstd


def emulate_npu_add_rms_norm(
    x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rms_norm(x1 + x2), rstd, x1 + x2); the sum is normalized in fp32."""
    _require(x1.dtype == x2.dtype == gamma.dtype, "npu_add_rms_norm: dtypes must agree")
    _require(x1.shape == x2.shape, "npu_add_rms_norm: x1 and x2 shapes must agree")
    s = x1.float() + x2.float()
    rstd = _rstd(s, gamma, epsilon)
    return (s * rstd * gamma.float()).to(x1.dtype), rstd, s.to(x1.dtype)


def emulate_npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """A, B = the two halves of x along dim; swish(A) * B."""
    _require(self.dtype in FLOATS, f"npu_swiglu takes fp16/bf16/fp32, not {self.dtype}")
    a, b = self.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(self.dtype)


# -------------------------------------------------------------------------------------------
# rotary embedding
# -------------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    _require(mode == "interleave", f"rotary_mode {mode!r} is not half or interleave")
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def emulate_npu_rotary_mul(
    self: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    rotary_mode: str = "half",
    rotate: torch.Tensor | None = None,
) -> torch.Tensor:
    """output = r1 * x + r2 * rotate(x), x 4-D, r1/r2 broadcast over it (e.g. 1S1D for BSND)."""
    _require(rotate is None, "the emulation covers rotate=None only")
    _require(self.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "npu_rotary_mul is 4-D")
    _require(self.dtype == r1.dtype == r2.dtype, "npu_rotary_mul: dtypes must agree")
    _require(r1.shape[-1] == self.shape[-1] and self.shape[-1] % 2 == 0, "D must match, even")
    torch.broadcast_shapes(self.shape, r1.shape, r2.shape)
    x = self.float()
    return (r1.float() * x + r2.float() * _rotate(x, rotary_mode)).to(self.dtype)


def emulate_npu_apply_rotary_pos_emb(
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str = "BSND",
    rotary_mode: str = "half",
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k rotated in place (``half`` mode), cos/sin (T, 1, D) for TND; returns (q, k)."""
    _require(layout in ("BSND", "TND"), f"Atlas A2/A3 take layout BSND or TND, not {layout}")
    _require(rotary_mode == "half", "Atlas A2/A3 take rotary_mode half only")
    _require(query.dtype == key.dtype == cos.dtype == sin.dtype, "dtypes must agree")
    dims = 3 if layout == "TND" else 4
    _require(query.dim() == key.dim() == cos.dim() == sin.dim() == dims, f"{layout} is {dims}-D")
    d = query.shape[-1]
    _require(d in (64, 128) and key.shape[-1] == d == cos.shape[-1], "D must be 64 or 128")
    _require(cos.shape[-2] == 1 and cos.shape[:-2] == query.shape[:-2], "cos: (T, 1, D)")
    _require(sin.shape == cos.shape, "sin and cos shapes must agree")
    for x in (query, key):
        xf = x.float()
        x.copy_(cos.float() * xf + sin.float() * _rotate(xf, "half"))
    return query, key


# -------------------------------------------------------------------------------------------
# KV cache and attention
# -------------------------------------------------------------------------------------------


def emulate_npu_scatter_pa_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    compress_lens: torch.Tensor | None = None,
    compress_seq_offsets: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    cache_mode: str | None = "PA_NZ",
) -> None:
    """Scenario 2 of the docs: key (T, N, D), caches (blocks, block_size, N, D) in ND format
    (cache_mode None or 'Norm'); token t goes to flat slot slot_mapping[t]."""
    _require(cache_mode in (None, "Norm"), f"cache_mode {cache_mode!r}: an ND cache needs 'Norm'")
    _require(compress_lens is None and seq_lens is None, "the emulation covers scenario 2 only")
    tensors = (key, value, key_cache, value_cache, slot_mapping)
    _require(all(t.is_contiguous() for t in tensors), "inputs must be contiguous")
    _require(key.dtype == value.dtype == key_cache.dtype == value_cache.dtype, "dtypes must agree")
    _require(slot_mapping.dtype in (torch.int32, torch.int64), "slot_mapping: int32 or int64")
    _require(key.dim() == 3 and key_cache.dim() == 4, "key (T, N, D) and a 4-D cache")
    _require(key.shape[0] == slot_mapping.shape[0], "one slot per token")
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    slots = slot_mapping.long()
    _require(bool(((slots >= 0) & (slots < num_slots)).all()), "slots in [0, blocks*block_size)")
    _require(slots.unique().numel() == slots.numel(), "slots must not repeat")
    key_cache.view(num_slots, *key_cache.shape[2:])[slots] = key
    value_cache.view(num_slots, *value_cache.shape[2:])[slots] = value


def _paged_keys(cache: torch.Tensor, table: torch.Tensor, length: int, heads: int) -> torch.Tensor:
    """The first ``length`` keys of one sequence from a (blocks, block_size, H) cache, as
    (length, heads, D) fp32."""
    block_size = cache.shape[1]
    n = -(-length // block_size)
    rows = cache[table[:n].long()].reshape(n * block_size, heads, -1)
    return rows[:length].float()


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed: torch.Tensor
) -> torch.Tensor:
    """q (Lq, Hq, D), k/v (L, Hkv, D) fp32, allowed (Lq, L) bool -> (Lq, Hq, D) fp32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def emulate_npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: list[int] | None = None,
    actual_seq_lengths_kv: list[int] | None = None,
    block_table: torch.Tensor | None = None,
    num_heads: int = 1,
    scale: float = 1.0,
    pre_tokens: int = 2147483647,
    next_tokens: int = 2147483647,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
    block_size: int = 0,
    softmax_lse_flag: bool = False,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Page attention (block_table given) in the two forms the docs describe:

    - ``TND`` (several queries per sequence): query (T, N, D); ``actual_seq_lengths`` the
      cumulative query counts, ``actual_seq_lengths_kv`` each sequence's key count. Sparse mode
      3 is causal from the bottom-right corner (the last query sees the last key), mode 4 a
      band of ``pre_tokens`` before and ``next_tokens`` after that diagonal; both take the
      2048 x 2048 mask that is True above the diagonal. Mode 0 without a mask sees every key.
    - ``BSH`` with S = 1 (decode): query (B, 1, N * D), ``actual_seq_lengths_kv`` per sequence;
      an optional (B, 1, 1, KV_S) bool mask, True = masked, KV_S at least the table's span.

    Keys and values are (blocks, block_size, Hkv * D). Returns (out like query, empty lse).
    """
    _require(all(v is None for v in unused.values()), f"unemulated arguments {sorted(unused)}")
    _require(
        query.dtype in HALF and key.dtype == value.dtype == query.dtype,
        f"query/key/value: fp16 or bf16 and equal, not {query.dtype}/{key.dtype}",
    )
    _require(
        query.is_contiguous() and key.is_contiguous() and value.is_contiguous(),
        "query, key and value must be contiguous",
    )
    block_table = _given(block_table, "the emulation covers page attention only")
    hkv = num_key_value_heads or num_heads
    _require(num_heads % hkv == 0 and num_heads // hkv <= 64, "num_heads / kv heads: int <= 64")
    _require(block_table.dtype == torch.int32 and block_table.dim() == 2, "block_table int32 2-D")
    _require(
        key.dim() == 3 and key.shape == value.shape and key.shape[1] == block_size,
        "paged key/value: (blocks, block_size, H)",
    )
    _require(block_size > 0 and block_size <= 512, "block_size in (0, 512]")
    kv_lens = _given(actual_seq_lengths_kv, "page attention needs actual_seq_lengths_kv")
    batch = block_table.shape[0]
    _require(len(kv_lens) == batch, "one kv length per block-table row")
    d = key.shape[2] // hkv
    span = block_table.shape[1] * block_size
    _require(max(kv_lens) <= span, "kv lengths exceed the block table")
    lse = torch.empty(0, dtype=torch.float32)

    if input_layout == "TND":
        _require(block_size % 128 == 0, "with several queries, block_size is a multiple of 128")
        _require(query.dim() == 3 and query.shape[1:] == (num_heads, d), "TND query: (T, N, D)")
        ends = list(_given(actual_seq_lengths, "TND needs cumulative actual_seq_lengths"))
        _require(len(ends) == batch, "one cumulative query length per sequence")
        _require(all(a <= b for a, b in zip([0, *ends], ends)), "cumulative lengths decrease")
        _require(ends[-1] == query.shape[0], "the last cumulative length is T")
        if sparse_mode in (3, 4):
            expected = torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool), 1)
            _require(
                atten_mask is not None
                and atten_mask.shape == (MASK_SIZE, MASK_SIZE)
                and torch.equal(atten_mask.bool(), expected),
                "sparse modes 3/4 take the 2048x2048 mask, True above the diagonal",
            )
        else:
            _require(sparse_mode == 0 and atten_mask is None, "emulated: sparse 0 without mask")
        out = torch.empty(query.shape, dtype=torch.float32)
        start = 0
        for b, end in enumerate(ends):
            q_len, kv_len = end - start, kv_lens[b]
            if q_len:
                _require(q_len <= kv_len, "a sequence has more queries than keys")
                k = _paged_keys(key, block_table[b], kv_len, hkv)
                v = _paged_keys(value, block_table[b], kv_len, hkv)
                pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)  # bottom-right aligned
                kpos = torch.arange(kv_len).unsqueeze(0)
                if sparse_mode == 3:
                    allowed = kpos <= pos
                elif sparse_mode == 4:
                    allowed = (kpos >= pos - pre_tokens) & (kpos <= pos + next_tokens)
                else:
                    allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
                out[start:end] = _attend(query[start:end].float(), k, v, scale, allowed)
            start = end
        return out.to(query.dtype), lse

    _require(input_layout == "BSH", f"the emulation covers TND and BSH, not {input_layout}")
    _require(
        query.dim() == 3 and query.shape[0] == batch and query.shape[1] == 1,
        "decode: query (B, 1, N * D)",
    )
    _require(query.shape[2] == num_heads * d, "query's H is num_heads * D")
    _require(block_size % 16 == 0, "decode: block_size is a multiple of 16")
    if atten_mask is not None:
        _require(atten_mask.dtype in (torch.bool, torch.int8, torch.uint8), "mask: bool/int8")
        _require(atten_mask.shape == (batch, 1, 1, atten_mask.shape[-1]), "mask (B, 1, 1, KV_S)")
        _require(atten_mask.shape[-1] >= span, "mask spans at least the block table")
    q_all = query.view(batch, num_heads, d).float()
    out = torch.empty(batch, num_heads, d)
    for b in range(batch):
        kv_len = kv_lens[b]
        k = _paged_keys(key, block_table[b], kv_len, hkv)
        v = _paged_keys(value, block_table[b], kv_len, hkv)
        allowed = torch.ones(1, kv_len, dtype=torch.bool)
        if atten_mask is not None:
            allowed &= ~atten_mask[b, 0, 0, :kv_len].bool().unsqueeze(0)
        out[b] = _attend(q_all[b : b + 1], k, v, scale, allowed)[0]
    return out.reshape(query.shape).to(query.dtype), lse


# -------------------------------------------------------------------------------------------
# linear layers
# -------------------------------------------------------------------------------------------


def emulate_npu_format_cast(
    self: torch.Tensor, acl_format: int, *, customize_dtype: Any = None, input_dtype: Any = None
) -> torch.Tensor:
    """A CPU tensor has one layout: the logical contents are unchanged (a copy)."""
    _require(acl_format in (2, 29), f"acl_format {acl_format} is not ND (2) or FRACTAL_NZ (29)")
    return self.clone()


def emulate_npu_convert_weight_to_int4pack(
    weight: torch.Tensor, inner_k_tiles: int = 0
) -> torch.Tensor:
    """Eight int4 values per int32 along the last dimension. The docs say only that they are
    interleaved: the nibble order here (element j in bits 4j..4j+3) is this emulation's own,
    read back only by :func:`emulate_npu_weight_quant_batchmatmul`."""
    _require(weight.dtype == torch.int32 and weight.is_contiguous(), "int32, contiguous")
    _require(weight.dim() == 2 and weight.shape[-1] % 8 == 0, "2-D, last dim divisible by 8")
    _require(bool(((weight >= -8) & (weight <= 7)).all()), "values must be int4: [-8, 7]")
    nibbles = (weight & 0xF).reshape(*weight.shape[:-1], -1, 8).to(torch.int64)
    words = (nibbles << (4 * torch.arange(8))).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_int4(words: torch.Tensor) -> torch.Tensor:
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).flatten(-2)


def emulate_npu_weight_quant_batchmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    quant_scale: torch.Tensor | None = None,
    quant_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    inner_precise: int = 0,
    weight_dtype: int | None = None,
) -> torch.Tensor:
    """y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias, the scales per output
    channel ((1, N) or (N,)) or per group of K ((ceil(K / group), N)); weight (K, N) int8, or
    int4 packed in int32: (K, N / 8) contiguous, or the transpose of a contiguous (N, K / 8)."""
    _require(quant_scale is None and quant_offset is None, "the emulation covers no output quant")
    _require(x.dim() == 2 and x.dtype in HALF, "x: (M, K) fp16 or bf16")
    _require(antiquant_scale.dtype == x.dtype, "antiquant_scale must have x's dtype")
    if weight.dtype == torch.int32:
        w = _unpack_int4(weight) if weight.is_contiguous() else _unpack_int4(weight.T).T
    else:
        _require(weight.dtype == torch.int8, f"weight: int8 or int32 (int4), not {weight.dtype}")
        w = weight.to(torch.int64)
    k, n = w.shape
    _require(x.shape[1] == k, f"x's K {x.shape[1]} != weight's K {k}")
    scale = antiquant_scale.float().reshape(-1, n)
    offset = None
    if antiquant_offset is not None:
        _require(antiquant_offset.shape == antiquant_scale.shape, "offset and scale shapes agree")
        _require(antiquant_offset.dtype == x.dtype, "antiquant_offset must have x's dtype")
        offset = antiquant_offset.float().reshape(-1, n)
    if antiquant_group_size:
        g = antiquant_group_size
        _require(g % 32 == 0 and 32 <= g <= k - 1, "group size: a multiple of 32 in [32, K-1]")
        _require(scale.shape[0] == -(-k // g), "per-group scales: (ceil(K / group), N)")
    else:
        g = k
        _require(scale.shape[0] == 1, "per-channel scales: (1, N) or (N,)")
    wf = w.float()
    if offset is not None:
        wf = wf + offset.repeat_interleave(g, dim=0)[:k]
    wf = wf * scale.repeat_interleave(g, dim=0)[:k]
    y = x.float() @ wf
    if bias is not None:
        wanted = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        _require(bias.dtype == wanted, f"bias for {x.dtype} activations must be {wanted}")
        y = y + bias.float()
    return y.to(x.dtype)


def emulate_npu_dynamic_quant(
    input: torch.Tensor,
    *,
    smooth_scales: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
    dst_type: int | None = None,
    quant_mode: str = "pertoken",
    dst_type_max: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: scale = rowmax(|x|) / 127, y = round(x / scale)."""
    _require(smooth_scales is None and group_index is None, "no smoothing emulated")
    _require(dst_type in (None, 1) and quant_mode == "pertoken", "per-token int8 only")
    _require(input.dtype in HALF and input.dim() > 1, "x: fp16 or bf16, more than 1-D")
    x = input.float()
    scale = x.abs().amax(dim=-1) / 127.0
    y = torch.round(x / scale.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).tiny))
    return y.to(torch.int8), scale


def emulate_npu_quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    *,
    offset: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    output_dtype: int | None = None,
    **unused: Any,
) -> torch.Tensor:
    """y = (x1 @ x2, accumulated in int32) * scale * pertoken_scale (+ bias), in output_dtype;
    x1 (M, K) int8, x2 (K, N) int8, scale (N,) or (1,), pertoken_scale (M,) fp32."""
    _require(all(v is None for v in unused.values()), f"unemulated arguments {sorted(unused)}")
    _require(offset is None, "no offset emulated")
    _require(x1.dtype == x2.dtype == torch.int8, "int8 x int8 only")
    _require(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], "(M, K) @ (K, N)")
    out_dtype = torch.int8 if output_dtype is None else _SCALAR_TYPES[int(output_dtype)]
    _require(out_dtype in HALF, "the emulation covers fp16 and bf16 outputs")
    _require(scale.dim() == 1 and scale.shape[0] in (1, x2.shape[1]), "scale: (N,) or (1,)")
    _require(scale.dtype in (torch.float32, torch.bfloat16), "scale: fp32 or bf16")
    if pertoken_scale is not None:
        _require(pertoken_scale.shape == (x1.shape[0],), "pertoken_scale: (M,)")
        _require(pertoken_scale.dtype == torch.float32, "pertoken_scale: fp32")
    acc = x1.double() @ x2.double()  # exact, as int32 accumulation is
    y = acc * scale.double()
    if pertoken_scale is not None:
        y = y * pertoken_scale.double().unsqueeze(1)
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


#: The CPU kernel of each emulated operator's default overload.
KERNELS: dict[str, Callable[..., Any]] = {
    "npu_rms_norm": emulate_npu_rms_norm,
    "npu_add_rms_norm": emulate_npu_add_rms_norm,
    "npu_swiglu": emulate_npu_swiglu,
    "npu_rotary_mul": emulate_npu_rotary_mul,
    "npu_apply_rotary_pos_emb": emulate_npu_apply_rotary_pos_emb,
    "npu_scatter_pa_kv_cache": emulate_npu_scatter_pa_kv_cache,
    "npu_fused_infer_attention_score": emulate_npu_fused_infer_attention_score,
    "npu_format_cast": emulate_npu_format_cast,
    "npu_convert_weight_to_int4pack": emulate_npu_convert_weight_to_int4pack,
    "npu_weight_quant_batchmatmul": emulate_npu_weight_quant_batchmatmul,
    "npu_dynamic_quant": emulate_npu_dynamic_quant,
    "npu_quant_matmul": emulate_npu_quant_matmul,
}
