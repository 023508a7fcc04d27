"""Qwen2 and Qwen2.5: the Llama layout with a bias on the q, k and v projections; layers at or
past ``max_window_layers`` use a sliding window when ``use_sliding_window`` is set (transformers
spells this out per layer in ``layer_types``)."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of, layer_windows


class Qwen2ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2ForCausalLM",)
    honoured = frozenset(
        {"hidden_act", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
    )

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        return DecoderOptions(
            qkv_bias=True,
            activation=activation_of(config),
            windows=layer_windows(config, per_layer_types=True),
        )
