"""Phi-3 and Phi-4: the Llama layout with fused ``qkv_proj`` and ``gate_up_proj`` tensors, an
optional sliding window on every layer, partial rotary (Phi-4-mini) and LongRoPE scaling."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of, layer_windows


class Phi3ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Phi3ForCausalLM",)
    honoured = frozenset({"hidden_act", "sliding_window", "original_max_position_embeddings"})

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        return DecoderOptions(
            fused_qkv=True,
            fused_gate_up=True,
            activation=activation_of(config),
            windows=layer_windows(config, per_layer_types=False),
        )
