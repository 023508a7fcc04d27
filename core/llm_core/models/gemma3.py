"""Gemma 3 (text): Gemma 2's layer with (1 + w) RMSNorm on each query and key head, no attention
soft-cap, and its own rope for sliding-window (local) and global layers (``rope_parameters``
per layer type: local base 10000, global base and scaling from the config)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from llm_hal import DType

from llm_core.models.decoder import DecoderLM, DecoderOptions, layer_types
from llm_core.models.gemma2 import Gemma2ForCausalLM


class Gemma3ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Gemma3ForCausalLM",)
    refused_dtypes: ClassVar[dict[DType, str]] = Gemma2ForCausalLM.refused_dtypes
    # transformers' Gemma 3 ignores attn_logit_softcapping: refused when set, not honoured.
    honoured = (Gemma2ForCausalLM.honoured - {"attn_logit_softcapping"}) | {"rope_local_base_freq"}

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        return dataclasses.replace(
            Gemma2ForCausalLM.declare(config),
            qk_norm=True,
            attn_soft_cap=None,
            rope_types=layer_types(config),
        )
