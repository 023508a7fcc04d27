"""The Llama family: Llama 2 and 3, SmolLM2, TinyLlama (and the GGUF "llama" architecture).

``attention_bias`` puts a bias on q, k, v and o; ``mlp_bias`` on gate, up and down.
"""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of


class LlamaForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM",)
    honoured = frozenset({"hidden_act", "attention_bias", "mlp_bias"})

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            activation=activation_of(config),
        )
