"""Qwen3 (dense): the Llama layout with RMSNorm on each query and key head before rotary."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_hal import Backend, DType

from llm_core.models.decoder import DecoderLM, DecoderOptions


class Qwen3ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen3ForCausalLM",)

    def __init__(self, config: Any, backend: Backend, dtype: DType):
        if getattr(config, "use_sliding_window", False):
            raise ValueError(
                "Qwen3 checkpoints with use_sliding_window=true are not supported yet; "
                "set use_sliding_window to false in config.json"
            )
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, backend, dtype, DecoderOptions(qkv_bias=bias, qk_norm=True))
