"""Qwen3 (dense): the Llama layout with RMSNorm on each query and key head before rotary;
``attention_bias`` biases q, k, v and o; per-layer sliding windows as Qwen2."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of, layer_windows
from llm_core.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen3ForCausalLM",)
    honoured = Qwen2ForCausalLM.honoured | {"attention_bias"}

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=True,
            activation=activation_of(config),
            windows=layer_windows(config, per_layer_types=True),
        )
