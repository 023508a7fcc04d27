"""The reference implementation of every HAL operator, in plain device-agnostic PyTorch.

It is the oracle of the conformance suite (run it on CPU in float64) and the default that a
torch-device backend inherits, so a new vendor starts with everything working and replaces
operators one at a time. Clarity beats speed here: loops over sequences are fine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from llm_hal.backend import OPS, Backend, LogprobsResult, MemoryInfo, Tensor
from llm_hal.dtypes import DType, from_torch, to_torch
from llm_hal.errors import UnsupportedOpError
from llm_hal.metadata import AttentionMetadata, PenaltyMetadata, SamplingMetadata
from llm_hal.spec import DeviceInfo
from llm_hal.weights import LinearWeight, QuantScheme


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp64 stays fp64, everything else becomes fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def host_memory_info() -> MemoryInfo:
    """Physical memory of this machine and what is available to new allocations (Linux)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = total
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    return MemoryInfo(total=int(total), free=int(free))


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def dtype_rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (to nearest even), as a Python float: the factor of
    ``scale``."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def check_soft_cap(cap: float) -> None:
    """``soft_cap``'s argument check: a positive cap (``ValueError`` otherwise)."""
    if not cap > 0:
        raise ValueError(f"soft_cap needs a cap > 0, not {cap!r}")


def dequantize(w: LinearWeight) -> torch.Tensor:
    """The dense ``(N, K)`` weight a quantized :class:`LinearWeight` stands for, in fp32
    (fp64 if its scales are fp64)."""
    acc = (
        torch.float64 if w.scales is not None and w.scales.dtype == torch.float64 else torch.float32
    )
    if w.scheme is QuantScheme.NONE:
        return _acc(w.weight)
    if w.scales is None:
        raise ValueError(f"a {w.scheme.value} weight needs scales")
    if w.scheme is QuantScheme.W8A8:
        return w.weight.to(acc) * w.scales.to(acc).reshape(-1, 1)
    if w.scheme is QuantScheme.W4A16:
        lo = (w.weight & 0x0F).to(acc)
        hi = (w.weight >> 4).to(acc)
        q = torch.stack((lo, hi), dim=-1).reshape(w.out_features, w.in_features)  # (N, K)
    else:
        q = w.weight.to(acc)
    group = w.group_size or w.in_features
    scales = w.scales.to(acc).repeat_interleave(group, dim=1)  # (N, K)
    if w.zeros is not None:
        q = q - w.zeros.to(acc).repeat_interleave(group, dim=1)
    return q * scales


class TorchBackend(Backend):
    """Every HAL operator in plain PyTorch, on any torch device."""

    name: ClassVar[str] = "reference"
    float_dtypes: ClassVar[frozenset[DType]] = frozenset(
        {DType.FP64, DType.FP32, DType.FP16, DType.BF16}
    )

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._tp_group: Any = None

    # ------------------------------------------------------------------------------------------
    # device and memory
    # ------------------------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(index=self.device.index or 0, name=str(self.device), total_memory=0)

    def memory_info(self) -> MemoryInfo:
        if self.device.type == "cpu":
            return host_memory_info()
        free, total = getattr(torch, self.device.type).mem_get_info(self.device)
        return MemoryInfo(total=int(total), free=int(free))

    def synchronize(self) -> None:
        return None

    def empty(self, shape: Sequence[int], dtype: DType) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=to_torch(dtype), device=self.device)

    def from_host(self, data: Any, dtype: DType | None = None) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
        target = to_torch(dtype) if dtype is not None else t.dtype
        return t.to(device=self.device, dtype=target, copy=True).contiguous()

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to("cpu", copy=True).contiguous()

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return dst.copy_(src)

    def dtype_of(self, tensor: torch.Tensor) -> DType:
        return from_torch(tensor.dtype)

    def reshape(self, tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return tensor.reshape(tuple(shape))

    def split(self, tensor: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
        return list(torch.split(tensor, list(sizes), dim=-1))

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: DType
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_blocks, block_size, num_kv_heads, head_size)
        t = to_torch(dtype)
        return (
            torch.zeros(shape, dtype=t, device=self.device),
            torch.zeros(shape, dtype=t, device=self.device),
        )

    def prepare_linear(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        scheme: QuantScheme = QuantScheme.NONE,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        group_size: int = 0,
    ) -> LinearWeight:
        n = weight.shape[0]
        k = weight.shape[1] * (2 if scheme is QuantScheme.W4A16 else 1)
        if scheme is not QuantScheme.NONE and scales is None:
            raise ValueError(f"{scheme.value} weights need scales")
        if group_size and k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
        return LinearWeight(weight, bias, scheme, n, k, scales, zeros, group_size)

    def native_ops(self) -> frozenset[str]:
        """Operators this backend implements itself: those a subclass overrides, not the
        reference's own."""
        inherited = {op for op in OPS if getattr(type(self), op) is getattr(TorchBackend, op)}
        return super().native_ops() - inherited

    # ------------------------------------------------------------------------------------------
    # operators
    # ------------------------------------------------------------------------------------------

    def embedding(
        self, ids: torch.Tensor, table: torch.Tensor, out: Tensor | None = None
    ) -> Tensor:
        return _into(out, F.embedding(ids.long(), table))

    def linear(self, x: torch.Tensor, weight: LinearWeight, out: Tensor | None = None) -> Tensor:
        acc = _acc_dtype(x.dtype)
        if weight.scheme is QuantScheme.W8A8:
            xf = x.to(acc)
            a_scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # (T, 1)
            xq = torch.clamp(torch.round(xf / a_scale), -127, 127)
            # The int32 accumulation is exact in fp64 for any realistic K.
            y = (xq.double() @ weight.weight.double().T).to(acc)
            assert weight.scales is not None, "prepare_linear guarantees W8A8 scales"
            y = y * a_scale * weight.scales.to(acc).reshape(1, -1)
        else:
            y = x.to(acc) @ dequantize(weight).to(acc).T
        if weight.bias is not None:
            y = y + weight.bias.to(acc)
        return _into(out, y.to(x.dtype))

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        s = x if residual is None else (_acc(x) + _acc(residual)).to(x.dtype)
        sf = _acc(s)
        normed = (sf * torch.rsqrt(sf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
        y = _into(out, (_acc(normed) * _acc(weight)).to(x.dtype))
        return y, (None if residual is None else s)

    def gemma_rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        s = x if residual is None else (_acc(x) + _acc(residual)).to(x.dtype)
        sf = _acc(s)
        normed = sf * torch.rsqrt(sf.pow(2).mean(dim=-1, keepdim=True) + eps)
        y = _into(out, (normed * (1.0 + _acc(weight).to(sf.dtype))).to(x.dtype))
        return y, (None if residual is None else s)

    def layer_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        eps: float,
        out: Tensor | None = None,
    ) -> Tensor:
        xf = _acc(x)
        b = None if bias is None else _acc(bias)
        y = F.layer_norm(xf, (x.shape[-1],), _acc(weight), b, eps)
        return _into(out, y.to(x.dtype))

    def rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        head_size: int,
        is_neox_style: bool,
    ) -> tuple[Tensor, Tensor]:
        cs = cos_sin_cache[positions.long()]  # (T, R)
        rot = cs.shape[-1]
        cos, sin = cs[:, : rot // 2], cs[:, rot // 2 :]
        for x in (q, k):
            heads = x.view(x.shape[0], -1, head_size)  # (T, H, D), a view of x
            part = _acc(heads[..., :rot])
            c = cos.to(part.dtype).unsqueeze(1)  # (T, 1, R/2)
            s = sin.to(part.dtype).unsqueeze(1)
            if is_neox_style:
                a, b = part[..., : rot // 2], part[..., rot // 2 :]
                rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
            else:
                a, b = part[..., 0::2], part[..., 1::2]
                rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
            heads[..., :rot] = rotated.to(x.dtype)
        return q, k

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        slots = torch.from_numpy(meta.slot_mapping).to(key.device)
        keep = slots >= 0
        slots = slots[keep]
        num_blocks, block_size, hkv, d = key_cache.shape
        k_flat = key_cache.view(num_blocks * block_size, hkv, d)
        v_flat = value_cache.view(num_blocks * block_size, hkv, d)
        k_flat[slots] = key[keep].reshape(-1, hkv, d).to(key_cache.dtype)
        v_flat[slots] = value[keep].reshape(-1, hkv, d).to(value_cache.dtype)

    def _gather_context(self, cache: torch.Tensor, table: np.ndarray, length: int) -> torch.Tensor:
        block_size = cache.shape[1]
        n_blocks = -(-length // block_size)
        idx = torch.from_numpy(table[:n_blocks].astype(np.int64)).to(cache.device)
        return cache[idx].reshape(n_blocks * block_size, *cache.shape[2:])[:length]  # (L, Hkv, D)

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
        hkv, d = key_cache.shape[2], key_cache.shape[3]
        q_all = query.reshape(query.shape[0], -1, d)  # (T, Hq, D)
        hq = q_all.shape[1]
        acc = _acc_dtype(query.dtype)
        result = torch.empty(q_all.shape, dtype=query.dtype, device=query.device)
        starts = meta.query_start_loc
        for b in range(meta.num_seqs):
            q0, q1 = int(starts[b]), int(starts[b + 1])
            if q1 == q0:
                continue
            length = int(meta.seq_lens[b])
            k = self._gather_context(key_cache, meta.block_tables[b], length).to(acc)
            v = self._gather_context(value_cache, meta.block_tables[b], length).to(acc)
            k = k.repeat_interleave(hq // hkv, dim=1)  # (L, Hq, D)
            v = v.repeat_interleave(hq // hkv, dim=1)
            q = q_all[q0:q1].to(acc)  # (Lq, Hq, D)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # (Hq, Lq, L)
            if logits_soft_cap:
                scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
            q_pos = torch.arange(length - (q1 - q0), length, device=query.device).unsqueeze(1)
            k_pos = torch.arange(length, device=query.device).unsqueeze(0)
            allowed = k_pos <= q_pos
            if sliding_window:
                allowed &= k_pos > q_pos - sliding_window
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            result[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        return _into(out, result.reshape(query.shape[0], hq * d))

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
        meta.require_decode()
        return self.paged_attention_prefill(
            query, key_cache, value_cache, meta, scale, sliding_window, logits_soft_cap, out
        )

    def silu_and_mul(self, x: torch.Tensor, out: Tensor | None = None) -> Tensor:
        gate, up = _acc(x).chunk(2, dim=-1)
        return _into(out, (F.silu(gate) * up).to(x.dtype))

    def gelu_and_mul(
        self, x: torch.Tensor, approximate: str = "none", out: Tensor | None = None
    ) -> Tensor:
        gate, up = _acc(x).chunk(2, dim=-1)
        return _into(out, (F.gelu(gate, approximate=approximate) * up).to(x.dtype))

    def gelu(self, x: torch.Tensor, approximate: str = "none", out: Tensor | None = None) -> Tensor:
        return _into(out, F.gelu(_acc(x), approximate=approximate).to(x.dtype))

    def add(self, a: torch.Tensor, b: torch.Tensor, out: Tensor | None = None) -> Tensor:
        return _into(out, (_acc(a) + _acc(b)).to(a.dtype))

    def scale(self, x: torch.Tensor, factor: float, out: Tensor | None = None) -> Tensor:
        return _into(out, (_acc(x) * dtype_rounded(factor, x.dtype)).to(x.dtype))

    def soft_cap(self, x: torch.Tensor, cap: float, out: Tensor | None = None) -> Tensor:
        check_soft_cap(cap)
        return _into(out, (cap * torch.tanh(_acc(x) / cap)).to(x.dtype))

    def gather_rows(
        self, x: torch.Tensor, indices: torch.Tensor, out: Tensor | None = None
    ) -> Tensor:
        return _into(out, x.index_select(0, indices.long()))

    # ------------------------------------------------------------------------------------------
    # logits processing and sampling
    # ------------------------------------------------------------------------------------------

    def _counts(self, ids: np.ndarray, vocab: int, device: torch.device) -> torch.Tensor:
        t = torch.from_numpy(ids).to(device)
        counts = torch.zeros((t.shape[0], vocab + 1), dtype=torch.int64, device=device)
        counts.scatter_add_(1, torch.where(t < 0, vocab, t), torch.ones_like(t))
        return counts[:, :vocab]  # the pad column (-1 mapped to vocab) is dropped

    def apply_penalties(self, logits: torch.Tensor, meta: PenaltyMetadata) -> Tensor:
        vocab = logits.shape[1]
        dev = logits.device
        out_counts = self._counts(meta.output_ids, vocab, dev).to(logits.dtype)
        seen = (self._counts(meta.prompt_ids, vocab, dev) > 0) | (out_counts > 0)
        rep = torch.from_numpy(meta.repetition).to(dev, logits.dtype).unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(seen, penalized, logits))
        freq = torch.from_numpy(meta.frequency).to(dev, logits.dtype).unsqueeze(1)
        pres = torch.from_numpy(meta.presence).to(dev, logits.dtype).unsqueeze(1)
        logits -= freq * out_counts + pres * (out_counts > 0).to(logits.dtype)
        return logits

    def apply_token_bans(self, logits: torch.Tensor, banned: torch.Tensor) -> Tensor:
        rows, cols = torch.nonzero(banned >= 0, as_tuple=True)
        logits[rows, banned[rows, cols].long()] = float("-inf")
        return logits

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> Tensor:
        rows, vocab = logits.shape
        if bitmask.dim() != 2 or bitmask.shape[0] != rows or bitmask.shape[1] * 32 < vocab:
            raise ValueError(
                f"bitmask of shape {tuple(bitmask.shape)} for logits {tuple(logits.shape)}: "
                f"expected ({rows}, {(vocab + 31) // 32}) int32 words"
            )
        shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
        bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (B, W, 32)
        allowed = bits.reshape(rows, -1)[:, :vocab].bool()
        logits.masked_fill_(~allowed, float("-inf"))
        return logits

    def filtered_probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The distribution ``sample`` draws from (rows of greedy requests are one-hot)."""
        acc = _acc_dtype(logits.dtype)
        dev = logits.device
        x = logits.to(acc)
        temp = torch.from_numpy(meta.temperature).to(dev, acc).unsqueeze(1)
        greedy = temp == 0
        x = x / torch.where(greedy, torch.ones_like(temp), temp)
        top_k = torch.from_numpy(meta.top_k).to(dev)
        vocab = x.shape[1]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).long()
        sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
        kth = sorted_x.gather(1, (k - 1).unsqueeze(1))
        x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        sorted_p = probs.gather(1, order)
        top_p = torch.from_numpy(meta.top_p).to(dev, acc).unsqueeze(1)
        # Keep a token while the mass of strictly more likely tokens is below top_p.
        drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        min_p = torch.from_numpy(meta.min_p).to(dev, acc).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        one_hot = F.one_hot(logits.argmax(dim=-1), vocab).to(acc)
        return torch.where(greedy, one_hot, probs)

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> Tensor:
        greedy_ids = logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy_ids
        probs = self.filtered_probs(logits, meta)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Each row has its own
        # generator, so a row's token never depends on the rest of the batch.
        noise = torch.empty_like(probs)
        for b in range(probs.shape[0]):
            gen = torch.Generator(device=probs.device).manual_seed(int(meta.seeds[b]))
            noise[b].exponential_(generator=gen)
        drawn = (probs / noise).argmax(dim=-1)
        greedy = torch.from_numpy(meta.temperature == 0).to(logits.device)
        return torch.where(greedy, greedy_ids, drawn)

    def compute_logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
    ) -> LogprobsResult:
        lp = torch.log_softmax(_acc(logits), dim=-1)
        tok = lp.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)
        ranks = (lp > tok.unsqueeze(1)).sum(dim=-1) + 1
        top_vals, top_ids = lp.sort(dim=-1, descending=True, stable=True)
        return LogprobsResult(tok, ranks, top_vals[:, :num_top], top_ids[:, :num_top])

    # ------------------------------------------------------------------------------------------
    # mixture of experts
    # ------------------------------------------------------------------------------------------

    def moe_route(
        self, router_logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(_acc(router_logits), dim=-1)
        weights, ids = probs.topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def moe_experts(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: str = "silu",
        out: Tensor | None = None,
    ) -> Tensor:
        if activation not in ("silu", "gelu"):
            raise UnsupportedOpError(self.name, "moe_experts", f"activation {activation}")
        acc = _acc_dtype(x.dtype)
        xf = x.to(acc)
        result = torch.zeros(xf.shape, dtype=acc, device=x.device)
        for e in topk_ids.unique().tolist():
            tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
            gate, up = (xf[tok] @ w13[e].to(acc).T).chunk(2, dim=-1)
            act = F.silu(gate) if activation == "silu" else F.gelu(gate)
            y = (act * up) @ w2[e].to(acc).T
            result.index_add_(0, tok, y * topk_weights[tok, slot].to(acc).unsqueeze(1))
        return _into(out, result.to(x.dtype))

    # ------------------------------------------------------------------------------------------
    # collectives
    # ------------------------------------------------------------------------------------------

    def set_tensor_parallel_group(self, group: Any) -> None:
        """Use a ``torch.distributed`` process group for the collectives."""
        self._tp_group = group

    def _world(self) -> int:
        import torch.distributed as dist

        if self._tp_group is None or not dist.is_initialized():
            return 1
        return int(dist.get_world_size(self._tp_group))

    def all_reduce(self, x: torch.Tensor) -> Tensor:
        if self._world() > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self._tp_group)
        return x

    def all_gather(self, x: torch.Tensor) -> Tensor:
        world = self._world()
        if world == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=self._tp_group)
        return torch.cat(parts, dim=-1)
