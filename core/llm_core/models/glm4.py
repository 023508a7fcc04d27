"""GLM-4 (0414): norms before and after attention and MLP (plain RMSNorm), biased q/k/v
(``attention_bias``), fused ``gate_up_proj``, and partial GPT-J-style (interleaved) rotary."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of


class Glm4ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Glm4ForCausalLM",)
    honoured = frozenset({"hidden_act", "attention_bias"})

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        return DecoderOptions(
            norms=(
                "input_layernorm",
                "post_self_attn_layernorm",
                "post_attention_layernorm",
                "post_mlp_layernorm",
            ),
            qkv_bias=bool(getattr(config, "attention_bias", False)),
            fused_gate_up=True,
            activation=activation_of(config),
            neox_rope=False,
        )
