"""Mixtral: Mistral's layer with a sparse mixture-of-experts MLP. ``num_local_experts`` experts
of ``intermediate_size`` (``block_sparse_moe.experts.{e}.w1`` gate, ``w3`` up, ``w2`` down);
the router ``block_sparse_moe.gate`` sends each token to ``num_experts_per_tok`` of them by a
softmax over its logits, the chosen weights renormalized to sum to 1."""

from __future__ import annotations

from typing import Any, ClassVar

from llm_core.models.decoder import DecoderLM, DecoderOptions, activation_of, layer_windows
from llm_core.models.moe import MoeOptions, routed_experts, size_of


class MixtralForCausalLM(DecoderLM):
    architectures: ClassVar[tuple[str, ...]] = ("MixtralForCausalLM",)
    honoured = frozenset(
        {"hidden_act", "sliding_window", "num_local_experts", "num_experts_per_tok"}
    )

    @classmethod
    def declare(cls, config: Any) -> DecoderOptions:
        experts, top_k = routed_experts(config, "num_local_experts")
        return DecoderOptions(
            activation=activation_of(config),
            windows=layer_windows(config, per_layer_types=False),
            moe=MoeOptions(
                num_experts=experts,
                top_k=top_k,
                renormalize=True,
                intermediate_size=size_of(config, "intermediate_size"),
                prefix="block_sparse_moe.",
                projections=("w1", "w3", "w2"),
            ),
        )
