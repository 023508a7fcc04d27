"""The pre-norm decoder-only transformer shared by the Llama-like families.

Llama, Mistral, Qwen2 and Qwen3 differ only in options (bias on q/k/v, per-head q/k norms,
sliding window), so one implementation serves them; each family file sets the options.
Every computation is a HAL operator; this file only decides which operator runs when.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from llm_hal import Backend, DType, LinearWeight, Tensor

from llm_core.models.base import CausalLM, ForwardBatch
from llm_core.models.rope import cos_sin_cache


@dataclass(slots=True)
class DecoderOptions:
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None


@dataclass(slots=True)
class _Layer:
    attn_norm: Tensor  # (H,)
    wqkv: LinearWeight  # (q + 2 kv, H)
    wo: LinearWeight  # (H, q)
    mlp_norm: Tensor  # (H,)
    w13: LinearWeight  # (2I, H) = [gate; up]
    w2: LinearWeight  # (H, I)
    q_norm: Tensor | None = None  # (D,)
    k_norm: Tensor | None = None


class DecoderLM(CausalLM):
    """Token embedding, N x (attention + gated MLP) with RMSNorm, final norm, LM head."""

    def __init__(self, config: Any, backend: Backend, dtype: DType, options: DecoderOptions):
        super().__init__(config, backend, dtype)
        self.options = options
        c = config
        self.hidden = int(c.hidden_size)
        self.num_layers = int(c.num_hidden_layers)
        self.num_heads = int(c.num_attention_heads)
        self.num_kv_heads = int(getattr(c, "num_key_value_heads", None) or self.num_heads)
        self.head_size = int(getattr(c, "head_dim", None) or self.hidden // self.num_heads)
        self.vocab_size = int(c.vocab_size)
        self.max_position = int(c.max_position_embeddings)
        self.eps = float(c.rms_norm_eps)
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        self.scale = self.head_size**-0.5
        self.tie_embeddings = bool(getattr(c, "tie_word_embeddings", False))
        rope = _rope_parameters(c)
        rotary_dim = int(self.head_size * float(rope.get("partial_rotary_factor", 1.0)))
        table = cos_sin_cache(rotary_dim, self.max_position, float(rope["rope_theta"]), rope)
        self.cos_sin = backend.from_host(torch.from_numpy(table), DType.FP32)
        self.layers: list[_Layer] = []
        self.embed: Tensor = None
        self.final_norm: Tensor = None
        self.lm_head: LinearWeight | None = None

    # --------------------------------------------------------------------------------------
    # weights
    # --------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        host: dict[str, torch.Tensor] = {}
        pending: dict[int, dict[str, torch.Tensor]] = {}
        placed = 0
        for name, tensor in weights:
            if name.startswith("model.layers."):
                index = int(name.split(".")[2])
                parts = pending.setdefault(index, {})
                parts[name.split(".", 3)[3]] = tensor
                if len(parts) == self._tensors_per_layer():
                    placed += self._build_layer(index, pending.pop(index))
            else:
                host[name] = tensor
        if pending:
            index, parts = next(iter(pending.items()))
            raise ValueError(f"layer {index} is incomplete in the checkpoint: has {sorted(parts)}")
        missing = [
            i for i in range(self.num_layers) if i >= len(self.layers) or self.layers[i] is None
        ]
        if missing:
            raise ValueError(f"the checkpoint has no weights for layers {missing}")
        self.embed = self.upload(host["model.embed_tokens.weight"])
        self.final_norm = self.upload(host["model.norm.weight"])
        if "lm_head.weight" in host and not self.tie_embeddings:
            self.lm_head = self.upload_linear(host["lm_head.weight"])
        else:
            self.lm_head = self.backend.prepare_linear(self.embed)
            # Tied: the embedding reads the same table in the backend's prepared copy (its
            # documented (V, H) form), so the largest tensor is held once.
            self.embed = self.lm_head.weight
        placed += sum(_nbytes(t, self.dtype) for t in host.values() if t.dim() > 0)
        return placed

    def _tensors_per_layer(self) -> int:
        n = 9 + (3 if self.options.qkv_bias else 0) + (2 if self.options.qk_norm else 0)
        return n

    def _build_layer(self, index: int, p: dict[str, torch.Tensor]) -> int:
        def take(name: str) -> torch.Tensor:
            if name not in p:
                raise ValueError(f"layer {index} lacks {name} (has {sorted(p)})")
            return p.pop(name)

        attn = "self_attn."
        wqkv = torch.cat([take(attn + f"{x}_proj.weight") for x in "qkv"])
        bqkv = (
            torch.cat([take(attn + f"{x}_proj.bias") for x in "qkv"])
            if self.options.qkv_bias
            else None
        )
        w13 = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")])
        layer = _Layer(
            attn_norm=self.upload(take("input_layernorm.weight")),
            wqkv=self.upload_linear(wqkv, bqkv),
            wo=self.upload_linear(take(attn + "o_proj.weight")),
            mlp_norm=self.upload(take("post_attention_layernorm.weight")),
            w13=self.upload_linear(w13),
            w2=self.upload_linear(take("mlp.down_proj.weight")),
        )
        if self.options.qk_norm:
            layer.q_norm = self.upload(take(attn + "q_norm.weight"))
            layer.k_norm = self.upload(take(attn + "k_norm.weight"))
        if p:
            raise ValueError(f"layer {index} has unexpected weights: {sorted(p)}")
        while len(self.layers) <= index:
            self.layers.append(None)  # type: ignore[arg-type]
        self.layers[index] = layer
        numel = wqkv.numel() + w13.numel() + layer.wo.out_features * layer.wo.in_features
        numel += layer.w2.out_features * layer.w2.in_features
        return int(numel * self.dtype.itemsize)

    # --------------------------------------------------------------------------------------
    # forward
    # --------------------------------------------------------------------------------------

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        ops = self.backend
        # Computed once per step, not per layer: this Python runs for every eager step.
        attend = ops.paged_attention_decode if batch.attn.is_decode else ops.paged_attention_prefill
        h = ops.embedding(batch.input_ids, self.embed)  # (T, H)
        residual: Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x, residual = ops.rms_norm(h, layer.attn_norm, self.eps, residual)
            if residual is None:
                residual = h
            h = self._attention(layer, x, batch, k_cache, v_cache, attend)
            x, residual = ops.rms_norm(h, layer.mlp_norm, self.eps, residual)
            gate_up = ops.linear(x, layer.w13)  # (T, 2I)
            h = ops.linear(ops.silu_and_mul(gate_up), layer.w2)  # (T, H)
        h, _ = ops.rms_norm(h, self.final_norm, self.eps, residual)
        h = ops.gather_rows(h, batch.logits_indices)  # (B', H)
        assert self.lm_head is not None
        logits = ops.linear(h, self.lm_head)  # (B', V)
        if ops.dtype_of(logits) is not DType.FP32:
            out = ops.empty(ops.shape(logits), DType.FP32)
            logits = ops.copy_(out, logits)
        return logits

    def _attention(
        self,
        layer: _Layer,
        x: Tensor,
        batch: ForwardBatch,
        k_cache: Tensor,
        v_cache: Tensor,
        attend: Callable[..., Tensor],
    ) -> Tensor:
        ops = self.backend
        t = ops.shape(x)[0]
        qkv = ops.linear(x, layer.wqkv)  # (T, q + 2kv)
        q, k, v = ops.split(qkv, [self.q_size, self.kv_size, self.kv_size])
        if layer.q_norm is not None and layer.k_norm is not None:
            q, _ = ops.rms_norm(
                ops.reshape(q, (t * self.num_heads, self.head_size)), layer.q_norm, self.eps
            )
            k, _ = ops.rms_norm(
                ops.reshape(k, (t * self.num_kv_heads, self.head_size)), layer.k_norm, self.eps
            )
            q = ops.reshape(q, (t, self.q_size))
            k = ops.reshape(k, (t, self.kv_size))
        q, k = ops.rotary_embedding(batch.positions, q, k, self.cos_sin, self.head_size, True)
        ops.reshape_and_cache(k, v, k_cache, v_cache, batch.attn)
        o = attend(q, k_cache, v_cache, batch.attn, self.scale, self.options.sliding_window)
        return ops.linear(o, layer.wo)  # (T, H)


def _rope_parameters(config: Any) -> dict[str, Any]:
    """rope_theta and scaling from either the transformers 4.x or 5.x config layout."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        params.update(scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    if "partial_rotary_factor" not in params and hasattr(config, "partial_rotary_factor"):
        params["partial_rotary_factor"] = config.partial_rotary_factor
    return params


def _nbytes(t: torch.Tensor, dtype: DType) -> int:
    return int(t.numel() * dtype.itemsize)
