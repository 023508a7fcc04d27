"""Mistral: the Llama layout with an optional sliding attention window."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_hal import Backend, DType

from llm_core.models.decoder import DecoderLM, DecoderOptions


class MistralForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("MistralForCausalLM",)

    def __init__(self, config: Any, backend: Backend, dtype: DType):
        window = getattr(config, "sliding_window", None)
        super().__init__(config, backend, dtype, DecoderOptions(sliding_window=window or None))
