"""Mistral: the Llama layout with an optional sliding attention window on every layer."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of, layer_windows


class MistralForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("MistralForCausalLM",)
    honoured = frozenset({"hidden_act", "sliding_window"})

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        return DecoderOptions(
            activation=activation_of(config),
            windows=layer_windows(config, per_layer_types=False),
        )
