"""Qwen1.5-MoE and Qwen2-MoE: Qwen2's attention (``qkv_bias``, per-layer sliding windows) with a
mixture of ``num_experts`` experts of ``moe_intermediate_size`` (``mlp.gate``,
``mlp.experts.{e}.gate_proj/up_proj/down_proj``): softmax routing to ``num_experts_per_tok``,
renormalized only with ``norm_topk_prob``, plus a shared expert of
``shared_expert_intermediate_size`` that every token runs, scaled by
``sigmoid(mlp.shared_expert_gate(x))``. Layers listed in ``mlp_only_layers``, or off the
``decoder_sparse_step`` period, have the dense MLP of ``intermediate_size`` instead."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import (
    DecoderLM,
    DecoderOptions,
    activation_of,
    layer_types,
    layer_windows,
)
from llm_core.models.moe import MoeOptions, routed_experts, size_of

#: The fields of Qwen2/3-MoE's experts that the declarations read.
QWEN_MOE_FIELDS = frozenset(
    {
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    }
)


class Qwen2MoeForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2MoeForCausalLM",)
    honoured = QWEN_MOE_FIELDS | {
        "hidden_act",
        "qkv_bias",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "layer_types",
        "num_experts",
        "shared_expert_intermediate_size",
    }

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        # transformers sets sliding_window to 0 without use_sliding_window.
        no_window = not config.sliding_window and "sliding_attention" not in layer_types(config)
        return DecoderOptions(
            qkv_bias=bool(config.qkv_bias),
            activation=activation_of(config),
            windows=() if no_window else layer_windows(config, per_layer_types=True),
            moe=qwen_experts(config, shared=True),
        )


def qwen_experts(config: Any, *, shared: bool) -> MoeOptions | None:
    """The experts of Qwen2-MoE (``shared``: with its gated shared expert) and Qwen3-MoE; None
    when no layer has them."""
    sparse = sparse_layers(config)
    if not any(sparse):
        return None
    experts, top_k = routed_experts(config, "num_experts")
    return MoeOptions(
        num_experts=experts,
        top_k=top_k,
        renormalize=bool(config.norm_topk_prob),
        intermediate_size=size_of(config, "moe_intermediate_size"),
        shared_intermediate_size=size_of(config, "shared_expert_intermediate_size")
        if shared
        else 0,
        sparse_layers=sparse,
    )


def sparse_layers(config: Any) -> tuple[bool, ...]:
    """transformers' rule for Qwen2/3-MoE: layer ``i`` has the experts unless
    ``mlp_only_layers`` lists it, when ``num_experts > 0`` and ``(i + 1) %
    decoder_sparse_step == 0``; the others have the dense MLP."""
    n = int(config.num_hidden_layers)
    step = int(config.decoder_sparse_step)
    if step < 1:
        raise ValueError(
            f"config.decoder_sparse_step={step} must be at least 1 (every step-th layer has "
            "the experts)"
        )
    dense = [int(i) for i in config.mlp_only_layers or ()]
    outside = [i for i in dense if not 0 <= i < n]
    if outside:
        raise ValueError(
            f"config.mlp_only_layers lists layers {outside}, but the model has layers 0 to {n - 1}"
        )
    has_experts = int(config.num_experts) > 0
    return tuple(has_experts and i not in dense and (i + 1) % step == 0 for i in range(n))
