"""The pre-norm decoder-only transformer shared by every dense family.

Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3/4 and GLM-4 differ only in data: which tensors a layer
has (biases, fused projections, per-head q/k norms, norms after attention and MLP), the norm
convention, the activation, the rope tables and window of each layer, soft-caps and scales.
Each family file turns its config into a :class:`DecoderOptions`; this file is the one forward.
Every computation is a HAL operator; this file only decides which operator runs when.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from llm_hal import Backend, DType, LinearWeight, Tensor

from llm_core.models.base import CausalLM, ForwardBatch, UnsupportedDTypeError
from llm_core.models.config_check import check_config_fields
from llm_core.models.rope import RopeTable, rope_parameters, rope_table

#: transformers' ``hidden_act`` names -> the gated activation op that computes them.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


@dataclass(frozen=True, slots=True)
class DecoderOptions:
    """What a family's layers hold and how they compute; built from its config."""

    #: Names of the four norms of a layer in the checkpoint: before attention, after attention
    #: (None: absent), before the MLP, after the MLP (None: absent).
    norms: tuple[str, str | None, str, str | None] = (
        "input_layernorm",
        None,
        "post_attention_layernorm",
        None,
    )
    gemma_norm: bool = False  # (1 + w) RMSNorm computed in fp32 (Gemma) instead of Llama's
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on every query and key head before rotary
    fused_qkv: bool = False  # one self_attn.qkv_proj instead of q/k/v_proj (Phi-3)
    fused_gate_up: bool = False  # one mlp.gate_up_proj instead of gate/up_proj (Phi-3, GLM-4)
    activation: str = "silu"  # silu | gelu | gelu_tanh, gating the up projection
    neox_rope: bool = True  # False: GPT-J (interleaved) pairs (GLM-4)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) in the model dtype (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale**-2 when not head_dim (Gemma)
    attn_soft_cap: float | None = None  # cap * tanh(score / cap) (Gemma 2)
    final_soft_cap: float | None = None  # cap * tanh(logit / cap) (Gemma 2)
    #: Per layer: its attention window (None: full attention) and its rope layer type (the key
    #: of a per-layer-type ``rope_parameters``, Gemma 3; None: the one rope of the model).
    windows: tuple[int | None, ...] = ()
    rope_types: tuple[str | None, ...] = ()


@dataclass(slots=True)
class _Layer:
    attn_norm: Tensor  # (H,)
    wqkv: LinearWeight  # (q + 2 kv, H)
    wo: LinearWeight  # (H, q)
    mlp_norm: Tensor  # (H,)
    w13: LinearWeight  # (2I, H) = [gate; up]
    w2: LinearWeight  # (H, I)
    rope: int  # index into DecoderLM.rope_tables
    window: int | None
    post_attn_norm: Tensor | None = None  # (H,)
    post_mlp_norm: Tensor | None = None  # (H,)
    q_norm: Tensor | None = None  # (D,)
    k_norm: Tensor | None = None


class DecoderLM(CausalLM):
    """Token embedding, N x (attention + gated MLP) with RMSNorm, final norm, LM head.

    A family subclass sets ``architectures`` and implements :meth:`declare`; ``honoured``
    lists the config fields beyond the common ones that its options read (every other field
    must keep its config class's default, see :func:`check_config_fields`).
    """

    honoured: ClassVar[frozenset[str]] = frozenset()
    #: dtypes the family cannot be served in, with the reason (checked at construction).
    refused_dtypes: ClassVar[dict[DType, str]] = {}

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        """The family's declaration for this config. Raises ValueError for what it refuses."""
        raise NotImplementedError

    def __init__(self, config: Any, backend: Backend, dtype: DType):
        super().__init__(config, backend, dtype)
        if dtype in type(self).refused_dtypes:
            raise UnsupportedDTypeError(
                f"{type(self).__name__} cannot be served in {dtype.value}: "
                f"{type(self).refused_dtypes[dtype]}"
            )
        check_config_fields(config, type(self).__name__, type(self).honoured)
        self.options = options = type(self).declare(config)
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
        scalar = options.query_pre_attn_scalar or self.head_size
        self.scale = float(scalar) ** -0.5
        self.tie_embeddings = bool(getattr(c, "tie_word_embeddings", False))
        self._norm = backend.gemma_rms_norm if options.gemma_norm else backend.rms_norm
        self._act = _gated_activation(backend, options.activation)
        self._windows = options.windows or (None,) * self.num_layers
        self._rope_types = options.rope_types or (None,) * self.num_layers
        self.rope_tables, self._rope_of_layer, self._long_rope = self._build_rope(config)
        if self._long_rope is not None:
            self.rope_switch_length = self._long_rope.long_after
        self.layers: list[_Layer] = []
        self.embed: Tensor = None
        self.final_norm: Tensor = None
        self.lm_head: LinearWeight | None = None

    def _build_rope(self, config: Any) -> tuple[list[Tensor], list[int], RopeTable | None]:
        """One device table per distinct rope of the layers (Gemma 3: local and global)."""
        kinds = {str(kind): rope_parameters(config, kind) for kind in self._rope_types}
        for params in kinds.values():
            if params["rope_type"] == "dynamic":
                # Dynamic NTK exists to run past the trained context: serve factor x as many
                # positions (as vLLM does); the table follows transformers up to there.
                scaled = int(self.max_position * params["factor"])
                self.max_position = max(self.max_position, scaled)
        tables: dict[str, RopeTable] = {}
        for kind, params in kinds.items():
            rotary_dim = int(self.head_size * float(params.get("partial_rotary_factor", 1.0)))
            tables[kind] = rope_table(rotary_dim, self.max_position, params)
        long = [t for t in tables.values() if t.long_after is not None]
        if len({(t.long_after, t.long_offset) for t in long}) > 1:
            raise ValueError("layers with different LongRoPE switch lengths are not supported")
        host: list[np.ndarray] = []
        for t in tables.values():
            rows = t.table
            if long and t.long_after is None:
                # Every table answers the rows the LongRoPE switch asks for.
                rows = np.concatenate([rows, rows])
            host.append(rows)
        device = [self.backend.from_host(torch.from_numpy(rows), DType.FP32) for rows in host]
        index = list(tables)
        of_layer = [index.index(str(kind)) for kind in self._rope_types]
        return device, of_layer, (long[0] if long else None)

    def rope_rows(self, positions: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        if self._long_rope is None:
            return positions
        return self._long_rope.rows(positions, seq_lens)

    # --------------------------------------------------------------------------------------
    # weights
    # --------------------------------------------------------------------------------------

    @classmethod
    def tensor_shapes(
        cls, config: Any
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """Shapes of the global tensors, and of every tensor of one layer (names without the
        ``model.layers.N.`` prefix), that this config gives. Used to check a file before any
        weight is read and to assemble layers as their tensors stream in."""
        o = cls.declare(config)
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        inter = int(config.intermediate_size)
        q, kv = heads * head_dim, kv_heads * head_dim
        shapes: dict[str, tuple[int, ...]] = {}
        for norm in o.norms:
            if norm is not None:
                shapes[f"{norm}.weight"] = (hidden,)
        attn, mlp = "self_attn.", "mlp."
        projections = {"o_proj": ((hidden, q), o.o_bias)}
        if o.fused_qkv:
            projections["qkv_proj"] = ((q + 2 * kv, hidden), o.qkv_bias)
        else:
            for x, rows in (("q", q), ("k", kv), ("v", kv)):
                projections[f"{x}_proj"] = ((rows, hidden), o.qkv_bias)
        if o.fused_gate_up:
            projections["gate_up_proj"] = ((2 * inter, hidden), o.mlp_bias)
        else:
            projections["gate_proj"] = ((inter, hidden), o.mlp_bias)
            projections["up_proj"] = ((inter, hidden), o.mlp_bias)
        projections["down_proj"] = ((hidden, inter), o.mlp_bias)
        for name, (shape, bias) in projections.items():
            prefix = mlp if name.endswith(("gate_proj", "up_proj", "down_proj")) else attn
            shapes[f"{prefix}{name}.weight"] = shape
            if bias:
                shapes[f"{prefix}{name}.bias"] = shape[:1]
        if o.qk_norm:
            shapes[attn + "q_norm.weight"] = (head_dim,)
            shapes[attn + "k_norm.weight"] = (head_dim,)
        vocab = int(config.vocab_size)
        globals_ = {
            "model.embed_tokens.weight": (vocab, hidden),
            "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,),
        }
        return globals_, shapes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        _, layer_shapes = type(self).tensor_shapes(self.config)
        expected = set(layer_shapes)
        host: dict[str, torch.Tensor] = {}
        pending: dict[int, dict[str, torch.Tensor]] = {}
        built: set[int] = set()
        placed = 0
        for name, tensor in weights:
            if name.startswith("model.layers."):
                index = int(name.split(".")[2])
                part = name.split(".", 3)[3]
                if index in built or part not in expected:
                    raise ValueError(_unexpected(name, part, self.config))
                parts = pending.setdefault(index, {})
                parts[part] = tensor
                if len(parts) == len(expected):
                    placed += self._build_layer(index, pending.pop(index))
                    built.add(index)
            else:
                host[name] = tensor
        if pending:
            index, parts = next(iter(pending.items()))
            lacking = sorted(expected - set(parts))
            hint = ""
            if all(name.endswith(".bias") for name in lacking):
                hint = (
                    " (its config declares biases the file does not have: check "
                    "attention_bias / mlp_bias in config.json)"
                )
            raise ValueError(
                f"layer {index} is incomplete in the checkpoint: it lacks "
                f"{', '.join(lacking)}{hint}"
            )
        missing = [i for i in range(self.num_layers) if i not in built]
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

    def _build_layer(self, index: int, p: dict[str, torch.Tensor]) -> int:
        o = self.options
        attn, mlp = "self_attn.", "mlp."

        def bias(name: str, present: bool) -> torch.Tensor | None:
            return p.pop(name + ".bias") if present else None

        if o.fused_qkv:
            wqkv, bqkv = p.pop(attn + "qkv_proj.weight"), bias(attn + "qkv_proj", o.qkv_bias)
        else:
            wqkv = torch.cat([p.pop(attn + f"{x}_proj.weight") for x in "qkv"])
            bqkv = (
                torch.cat([p.pop(attn + f"{x}_proj.bias") for x in "qkv"]) if o.qkv_bias else None
            )
        if o.fused_gate_up:
            w13, b13 = p.pop(mlp + "gate_up_proj.weight"), bias(mlp + "gate_up_proj", o.mlp_bias)
        else:
            w13 = torch.cat([p.pop(mlp + "gate_proj.weight"), p.pop(mlp + "up_proj.weight")])
            b13 = (
                torch.cat([p.pop(mlp + "gate_proj.bias"), p.pop(mlp + "up_proj.bias")])
                if o.mlp_bias
                else None
            )
        pre_attn, post_attn, pre_mlp, post_mlp = o.norms
        layer = _Layer(
            attn_norm=self.upload(p.pop(f"{pre_attn}.weight")),
            wqkv=self.upload_linear(wqkv, bqkv),
            wo=self.upload_linear(p.pop(attn + "o_proj.weight"), bias(attn + "o_proj", o.o_bias)),
            mlp_norm=self.upload(p.pop(f"{pre_mlp}.weight")),
            w13=self.upload_linear(w13, b13),
            w2=self.upload_linear(
                p.pop(mlp + "down_proj.weight"), bias(mlp + "down_proj", o.mlp_bias)
            ),
            rope=self._rope_of_layer[index],
            window=self._windows[index],
        )
        if post_attn is not None:
            layer.post_attn_norm = self.upload(p.pop(f"{post_attn}.weight"))
        if post_mlp is not None:
            layer.post_mlp_norm = self.upload(p.pop(f"{post_mlp}.weight"))
        if o.qk_norm:
            layer.q_norm = self.upload(p.pop(attn + "q_norm.weight"))
            layer.k_norm = self.upload(p.pop(attn + "k_norm.weight"))
        assert not p, f"layer {index}: tensors left unused: {sorted(p)}"
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
        ops, norm, eps = self.backend, self._norm, self.eps
        # Computed once per step, not per layer: this Python runs for every eager step.
        attend = ops.paged_attention_decode if batch.attn.is_decode else ops.paged_attention_prefill
        h = ops.embedding(batch.input_ids, self.embed)  # (T, H)
        if self.options.embed_scale:
            h = ops.scale(h, self.hidden**0.5)
        residual: Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x, residual = norm(h, layer.attn_norm, eps, residual)
            if residual is None:
                residual = h
            h = self._attention(layer, x, batch, k_cache, v_cache, attend)
            if layer.post_attn_norm is not None:
                h, _ = norm(h, layer.post_attn_norm, eps)
            x, residual = norm(h, layer.mlp_norm, eps, residual)
            gate_up = ops.linear(x, layer.w13)  # (T, 2I)
            h = ops.linear(self._act(gate_up), layer.w2)  # (T, H)
            if layer.post_mlp_norm is not None:
                h, _ = norm(h, layer.post_mlp_norm, eps)
        h, _ = norm(h, self.final_norm, eps, residual)
        h = ops.gather_rows(h, batch.logits_indices)  # (B', H)
        assert self.lm_head is not None
        logits = ops.linear(h, self.lm_head)  # (B', V)
        if ops.dtype_of(logits) is not DType.FP32:
            out = ops.empty(ops.shape(logits), DType.FP32)
            logits = ops.copy_(out, logits)
        if self.options.final_soft_cap:
            logits = ops.soft_cap(logits, self.options.final_soft_cap)
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
            q, _ = self._norm(
                ops.reshape(q, (t * self.num_heads, self.head_size)), layer.q_norm, self.eps
            )
            k, _ = self._norm(
                ops.reshape(k, (t * self.num_kv_heads, self.head_size)), layer.k_norm, self.eps
            )
            q = ops.reshape(q, (t, self.q_size))
            k = ops.reshape(k, (t, self.kv_size))
        q, k = ops.rotary_embedding(
            batch.rope_positions,
            q,
            k,
            self.rope_tables[layer.rope],
            self.head_size,
            self.options.neox_rope,
        )
        ops.reshape_and_cache(k, v, k_cache, v_cache, batch.attn)
        o = attend(
            q, k_cache, v_cache, batch.attn, self.scale, layer.window, self.options.attn_soft_cap
        )
        return ops.linear(o, layer.wo)  # (T, H)


# ------------------------------------------------------------------------------------------
# helpers for the family declarations
# ------------------------------------------------------------------------------------------


def activation_of(config: Any, field: str = "hidden_act") -> str:
    """The gating activation named by ``config.<field>``, or a ValueError naming it."""
    name = getattr(config, field, None) or "silu"
    if name not in ACTIVATIONS:
        raise ValueError(
            f"config.{field}={name!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def layer_windows(config: Any, *, per_layer_types: bool) -> tuple[int | None, ...]:
    """Each layer's attention window. With ``per_layer_types`` the window applies to the
    layers ``config.layer_types`` marks "sliding_attention" (Gemma, Qwen2/3); otherwise to
    every layer (Mistral, Phi-3)."""
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    if window is not None and int(window) < 1:
        raise ValueError(f"config.sliding_window={window} must be a positive number of tokens")
    if not per_layer_types:
        return (int(window) if window else None,) * n
    types = layer_types(config)
    if window is None:
        if "sliding_attention" in types:
            raise ValueError(
                "config.layer_types has sliding_attention layers but no sliding_window"
            )
        return (None,) * n
    size = int(window)
    return tuple(size if t == "sliding_attention" else None for t in types)


def layer_types(config: Any) -> tuple[str, ...]:
    """``config.layer_types`` checked: one of full/sliding attention per layer."""
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    if len(types) != n:
        raise ValueError(
            f"config.layer_types has {len(types)} entries for num_hidden_layers={n}: give one "
            "per layer"
        )
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
        raise ValueError(
            f"config.layer_types holds {bad}: supported are full_attention and sliding_attention"
        )
    return tuple(types)


def _gated_activation(backend: Backend, kind: str) -> Callable[[Tensor], Tensor]:
    if kind == "silu":
        return backend.silu_and_mul
    approximate = "tanh" if kind == "gelu_tanh" else "none"
    return lambda x: backend.gelu_and_mul(x, approximate)


def _unexpected(name: str, part: str, config: Any) -> str:
    hint = ""
    if part.endswith(".bias"):
        hint = (
            " (the checkpoint has a bias its config does not declare: check attention_bias / "
            "mlp_bias in config.json)"
        )
    return (
        f"unexpected tensor {name} for {', '.join(getattr(config, 'architectures', None) or [])}"
        f"{hint}: the checkpoint does not match its config"
    )


def _nbytes(t: torch.Tensor, dtype: DType) -> int:
    return int(t.numel() * dtype.itemsize)
