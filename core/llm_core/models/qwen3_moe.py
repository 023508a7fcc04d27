"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm, ``attention_bias``, a sliding window on
every layer with ``use_sliding_window``) with Qwen2-MoE's experts minus the shared one: softmax
routing to ``num_experts_per_tok`` of ``num_experts``, renormalized with ``norm_topk_prob``
(true in the published checkpoints); ``mlp_only_layers`` and ``decoder_sparse_step`` as
Qwen2-MoE."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of, layer_windows
from llm_core.models.qwen2_moe import QWEN_MOE_FIELDS, qwen_experts


class Qwen3MoeForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen3MoeForCausalLM",)
    #: transformers 5 writes ``num_experts`` as ``num_local_experts``.
    honoured = QWEN_MOE_FIELDS | {
        "hidden_act",
        "attention_bias",
        "use_sliding_window",
        "sliding_window",
        "num_experts",
        "num_local_experts",
    }

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=True,
            activation=activation_of(config),
            # transformers sets sliding_window to None without use_sliding_window.
            windows=layer_windows(config, per_layer_types=False),
            moe=qwen_experts(config, shared=False),
        )
