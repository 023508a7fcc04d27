"""Gemma 3 (text): Gemma 2's layer with (1 + w) RMSNorm on each query and key head, no attention
soft-cap, and its own rope for sliding-window (local) and global layers (``rope_parameters``
per layer type: local base 10000, global base and scaling from the config)."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import (
    DecoderLM,
    DecoderOptions,
    activation_of,
    layer_types,
    layer_windows,
)
from llm_core.models.gemma2 import GEMMA_NORMS


class Gemma3ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Gemma3ForCausalLM",)
    honoured = frozenset(
        {
            "hidden_activation",
            "attention_bias",
            "query_pre_attn_scalar",
            "sliding_window",
            "layer_types",
            "final_logit_softcapping",
            "rope_local_base_freq",
        }
    )

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(
            norms=GEMMA_NORMS,
            gemma_norm=True,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=True,
            activation=activation_of(config, "hidden_activation"),
            embed_scale=True,
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            final_soft_cap=getattr(config, "final_logit_softcapping", None),
            windows=layer_windows(config, per_layer_types=True),
            rope_types=layer_types(config),
        )
