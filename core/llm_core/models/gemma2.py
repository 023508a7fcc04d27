"""Gemma 2: (1 + w) RMSNorm before and after both attention and MLP, embeddings scaled by
sqrt(hidden_size), GeGLU (tanh GELU), attention scaled by ``query_pre_attn_scalar``, soft-capped
attention scores and final logits, sliding-window and global layers alternating."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_hal import DType

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of, layer_windows

#: The four norms of a Gemma layer, in the order DecoderOptions.norms wants them.
GEMMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


#: Gemma's residual stream grows past float16's 65504: transformers' own fp16 forward of
#: Gemma 3 270M gives NaN logits (vLLM refuses fp16 for these families too).
GEMMA_FP16 = (
    "its activations overflow float16 (transformers' float16 forward gives NaN logits too); "
    "serve it in bfloat16 (its training dtype) or float32"
)


class Gemma2ForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("Gemma2ForCausalLM",)
    refused_dtypes: ClassVar[dict[DType, str]] = {DType.FP16: GEMMA_FP16}
    honoured = frozenset(
        {
            "hidden_activation",
            "attention_bias",
            "query_pre_attn_scalar",
            "sliding_window",
            "layer_types",
            "attn_logit_softcapping",
            "final_logit_softcapping",
        }
    )

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(
            norms=GEMMA_NORMS,
            gemma_norm=True,
            qkv_bias=bias,
            o_bias=bias,
            activation=activation_of(config, "hidden_activation"),
            embed_scale=True,
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            attn_soft_cap=getattr(config, "attn_logit_softcapping", None),
            final_soft_cap=getattr(config, "final_logit_softcapping", None),
            windows=layer_windows(config, per_layer_types=True),
        )
