"""The Llama family: Llama 2 and 3, SmolLM2, TinyLlama (and the GGUF "llama" architecture)."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_hal import Backend, DType

from llm_core.models.decoder import DecoderLM, DecoderOptions


class LlamaForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM",)

    def __init__(self, config: Any, backend: Backend, dtype: DType):
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, backend, dtype, DecoderOptions(qkv_bias=bias))
