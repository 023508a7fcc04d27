"""Qwen2 and Qwen2.5: the Llama layout with a bias on the q, k and v projections."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_hal import Backend, DType

from llm_core.models.decoder import DecoderLM, DecoderOptions


class Qwen2ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2ForCausalLM",)

    def __init__(self, config: Any, backend: Backend, dtype: DType):
        if getattr(config, "use_sliding_window", False):
            raise ValueError(
                "Qwen2 checkpoints with use_sliding_window=true (per-layer windows) are not "
                "supported yet; set use_sliding_window to false in config.json"
            )
        super().__init__(config, backend, dtype, DecoderOptions(qkv_bias=True))
