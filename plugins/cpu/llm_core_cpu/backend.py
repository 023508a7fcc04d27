"""The CPU backend: the reference operators, with the hot ones replaced by faster torch code.

Linear layers run in the activation dtype on oneDNN/MKL (bf16 GEMMs accumulate in fp32);
attention uses torch's fused scaled-dot-product kernel over the paged cache; norms and
activations avoid the reference's extra passes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from llm_hal import AttentionMetadata, DType, LinearWeight, QuantScheme, TorchBackend
from llm_hal.backend import Tensor


class CpuBackend(TorchBackend):
    name: ClassVar[str] = "cpu"
    float_dtypes: ClassVar[frozenset[DType]] = frozenset(
        {DType.FP32, DType.BF16, DType.FP16, DType.FP64}
    )
    # CPUs have fast bf16 GEMMs (AVX512-BF16, AMX) but slow fp16 ones.
    auto_dtype_substitutes: ClassVar[dict[DType, DType]] = {DType.FP16: DType.BF16}

    def __init__(self) -> None:
        super().__init__("cpu")

    def linear(self, x: torch.Tensor, weight: LinearWeight, out: Tensor | None = None) -> Tensor:
        if weight.scheme is not QuantScheme.NONE or weight.weight.dtype != x.dtype:
            return super().linear(x, weight, out)
        if out is None:
            return F.linear(x, weight.weight, weight.bias)
        if weight.bias is None:
            return torch.matmul(x, weight.weight.T, out=out)
        return torch.addmm(weight.bias, x, weight.weight.T, out=out)

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if residual is not None:
            s = x + residual if x.dtype == torch.float32 else (x.float() + residual).to(x.dtype)
        else:
            s = x
        sf = s.float() if s.dtype != torch.float64 else s
        variance = sf.pow(2).mean(dim=-1, keepdim=True)
        normed = (sf * torch.rsqrt(variance + eps)).to(x.dtype)
        if out is None:
            y = (
                normed * weight
                if weight.dtype == x.dtype
                else (normed.float() * weight).to(x.dtype)
            )
        else:
            y = torch.mul(normed, weight, out=out)
        return y, (None if residual is None else s)

    def silu_and_mul(self, x: torch.Tensor, out: Tensor | None = None) -> Tensor:
        d = x.shape[-1] // 2
        gate, up = x[..., :d], x[..., d:]
        if x.dtype in (torch.float32, torch.float64):
            return torch.mul(F.silu(gate), up, out=out) if out is not None else F.silu(gate) * up
        return super().silu_and_mul(x, out)

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        slots = meta.device_cache.get("cpu.slots")
        if slots is None:
            valid = meta.slot_mapping >= 0
            rows = torch.from_numpy(valid.nonzero()[0]) if not valid.all() else None
            slots = (torch.from_numpy(meta.slot_mapping[valid]), rows)
            meta.device_cache["cpu.slots"] = slots
        index, rows = slots
        hkv, d = key_cache.shape[2], key_cache.shape[3]
        k = key.reshape(-1, hkv, d) if rows is None else key.reshape(-1, hkv, d)[rows]
        v = value.reshape(-1, hkv, d) if rows is None else value.reshape(-1, hkv, d)[rows]
        key_cache.view(-1, hkv, d).index_copy_(0, index, k.to(key_cache.dtype))
        value_cache.view(-1, hkv, d).index_copy_(0, index, v.to(value_cache.dtype))

    def paged_attention_prefill(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        if logits_soft_cap:
            return super().paged_attention_prefill(
                query, key_cache, value_cache, meta, scale, sliding_window, logits_soft_cap, out
            )
        d = key_cache.shape[3]
        t = query.shape[0]
        q_all = query.reshape(t, -1, d)  # (T, Hq, D)
        result = out.view(t, -1, d) if out is not None else torch.empty_like(q_all)
        starts = meta.query_start_loc
        for b in range(meta.num_seqs):
            q0, q1 = int(starts[b]), int(starts[b + 1])
            if q1 == q0:
                continue
            length = int(meta.seq_lens[b])
            k = self._gather_context(key_cache, meta.block_tables[b], length)  # (L, Hkv, D)
            v = self._gather_context(value_cache, meta.block_tables[b], length)
            q = q_all[q0:q1].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
            k = k.transpose(0, 1).unsqueeze(0).to(q.dtype)  # (1, Hkv, L, D)
            v = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
            # 4-D inputs take torch's fused CPU kernel; a whole-prompt causal chunk needs no mask.
            plain_causal = q1 - q0 == length and not sliding_window
            mask = None if plain_causal else _causal_mask(q1 - q0, length, sliding_window)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=plain_causal, scale=scale, enable_gqa=True
            )[0]  # (Hq, Lq, D)
            result[q0:q1] = o.transpose(0, 1)
        return result.reshape(t, -1)

    def paged_attention_decode(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        if not meta.is_decode:
            raise ValueError("paged_attention_decode needs exactly one new token per sequence")
        if logits_soft_cap:
            return super().paged_attention_decode(
                query, key_cache, value_cache, meta, scale, sliding_window, logits_soft_cap, out
            )
        b, d = meta.num_seqs, key_cache.shape[3]
        block_size = key_cache.shape[1]
        # Sliding-window and global layers share one step's metadata: one entry per window.
        key = f"cpu.decode.{block_size}.{sliding_window or 0}"
        idx, mask = meta.device_cache.get(key, (None, None))
        if idx is None:
            n_blocks = -(-meta.max_seq_len // block_size)
            idx = torch.from_numpy(meta.block_tables[:, :n_blocks].astype("int64"))  # (B, nb)
            lens = torch.from_numpy(meta.seq_lens.astype("int64")).unsqueeze(1)
            # Table entries past a sequence's own blocks may hold anything: read block 0 there
            # (masked out below) rather than index with them.
            idx = idx.masked_fill(torch.arange(n_blocks) * block_size >= lens, 0)
            pos = torch.arange(n_blocks * block_size)
            allowed = pos.unsqueeze(0) < lens  # (B, L)
            if sliding_window:
                allowed &= pos.unsqueeze(0) > lens - 1 - sliding_window
            mask = allowed[:, None, None, :]  # (B, 1, 1, L)
            meta.device_cache[key] = (idx, mask)
        hkv = key_cache.shape[2]
        k = key_cache[idx].reshape(b, -1, hkv, d).transpose(1, 2)  # (B, Hkv, L, D)
        v = value_cache[idx].reshape(b, -1, hkv, d).transpose(1, 2)
        q = query.reshape(b, -1, 1, d)  # (B, Hq, 1, D)
        o = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
        )  # (B, Hq, 1, D)
        o = o.reshape(b, -1)
        if out is not None:
            out.copy_(o)
            return out
        return o


def _causal_mask(q_len: int, kv_len: int, sliding_window: int | None) -> torch.Tensor:
    """(Lq, L) bool: new token i (position kv_len - q_len + i) sees keys at or before it."""
    q_pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    k_pos = torch.arange(kv_len).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window:
        allowed &= k_pos > q_pos - sliding_window
    return allowed
