"""The sparse mixture-of-experts MLP of Mixtral and Qwen2/3-MoE, in HAL operators.

A router (a linear layer H -> E without bias, in the model's dtype as in transformers) scores
the experts of each token; ``moe_route`` takes the softmax in fp32 and keeps the top k (their
weights renormalized to sum to 1 where the family says so); ``moe_experts`` runs each token's
k gated-MLP experts and sums them by those weights. Qwen2-MoE adds a shared expert that every
token runs, gated by ``sigmoid(shared_expert_gate(x))``: it is served as a one-expert mixture
(``moe_route`` with sigmoid scores, E = k = 1, then ``moe_experts``), so the gate and the
product stay HAL operators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from llm_hal import Backend, LinearWeight, Tensor

#: The gating activations ``moe_experts`` computes.
MOE_ACTIVATIONS = ("silu", "gelu")


@dataclass(frozen=True, slots=True)
class MoeOptions:
    """A family's mixture-of-experts MLP, declared from its config."""

    num_experts: int
    top_k: int
    renormalize: bool  # the top-k weights of a token rescaled to sum to 1
    intermediate_size: int  # of one expert
    #: The checkpoint's names: the block (Mixtral: ``block_sparse_moe.``) and an expert's gate,
    #: up and down projections (Mixtral: ``w1``, ``w3``, ``w2``).
    prefix: str = "mlp."
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert (0: none)
    #: Per layer: whether its MLP is this block (False: the dense MLP of ``intermediate_size``,
    #: Qwen's ``mlp_only_layers`` and ``decoder_sparse_step``). Empty: every layer.
    sparse_layers: tuple[bool, ...] = ()

    def is_sparse(self, layer: int) -> bool:
        return not self.sparse_layers or self.sparse_layers[layer]

    def tensor_shapes(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """The block's tensors in one layer (names as published checkpoints have them)."""
        gate, up, down = self.projections
        inter, shared = self.intermediate_size, self.shared_intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            f"{self.prefix}gate.weight": (self.num_experts, hidden)
        }
        for e in range(self.num_experts):
            expert = f"{self.prefix}experts.{e}."
            shapes[f"{expert}{gate}.weight"] = (inter, hidden)
            shapes[f"{expert}{up}.weight"] = (inter, hidden)
            shapes[f"{expert}{down}.weight"] = (hidden, inter)
        if shared:
            expert = f"{self.prefix}shared_expert."
            shapes[f"{expert}gate_proj.weight"] = (shared, hidden)
            shapes[f"{expert}up_proj.weight"] = (shared, hidden)
            shapes[f"{expert}down_proj.weight"] = (hidden, shared)
            shapes[f"{self.prefix}shared_expert_gate.weight"] = (1, hidden)
        return shapes

    def unfuse(self, part: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """A layer tensor under its published name(s). transformers 5 holds the experts fused,
        and ``save_pretrained(save_original_format=False)`` writes them so: ``mlp.gate.weight``,
        ``mlp.experts.gate_up_proj`` (E, 2I, H) = [gate; up] and ``mlp.experts.down_proj``
        (E, H, I); those become per-expert views here. Other names pass unchanged."""
        gate, up, down = self.projections
        experts = f"{self.prefix}experts."
        if part == "mlp.experts.gate_up_proj" and tensor.dim() == 3:
            gates, ups = tensor.chunk(2, dim=1)  # (E, I, H) each
            return [
                *((f"{experts}{e}.{gate}.weight", w) for e, w in enumerate(gates)),
                *((f"{experts}{e}.{up}.weight", w) for e, w in enumerate(ups)),
            ]
        if part == "mlp.experts.down_proj" and tensor.dim() == 3:
            return [(f"{experts}{e}.{down}.weight", w) for e, w in enumerate(tensor)]
        if part == "mlp.gate.weight":
            return [(f"{self.prefix}gate.weight", tensor)]
        return [(part, tensor)]


@dataclass(slots=True)
class MoeBlock:
    """One layer's experts on the device, and their forward pass."""

    router: LinearWeight  # (E, H)
    w13: Tensor  # (E, 2I, H) = [gate; up] per expert
    w2: Tensor  # (E, H, I)
    top_k: int
    renormalize: bool
    activation: str  # silu | gelu
    shared_gate: LinearWeight | None = None  # (1, H)
    shared_w13: Tensor | None = None  # (1, 2S, H): the shared expert, a one-expert mixture
    shared_w2: Tensor | None = None  # (1, H, S)

    @classmethod
    def build(
        cls,
        options: MoeOptions,
        parts: dict[str, torch.Tensor],
        activation: str,
        upload: Callable[[torch.Tensor], Tensor],
        upload_linear: Callable[[torch.Tensor], LinearWeight],
    ) -> tuple[MoeBlock, int]:
        """The block from its host tensors (popped from ``parts``, shapes already checked);
        returns it and the number of weights placed on the device."""
        gate, up, down = options.projections
        experts = f"{options.prefix}experts."
        w13 = torch.stack(
            [
                torch.cat(
                    [
                        parts.pop(f"{experts}{e}.{gate}.weight"),
                        parts.pop(f"{experts}{e}.{up}.weight"),
                    ]
                )
                for e in range(options.num_experts)
            ]
        )  # (E, 2I, H)
        w2 = torch.stack(
            [parts.pop(f"{experts}{e}.{down}.weight") for e in range(options.num_experts)]
        )  # (E, H, I)
        router = parts.pop(f"{options.prefix}gate.weight")
        block = cls(
            router=upload_linear(router),
            w13=upload(w13),
            w2=upload(w2),
            top_k=options.top_k,
            renormalize=options.renormalize,
            activation=activation,
        )
        numel = router.numel() + w13.numel() + w2.numel()
        if options.shared_intermediate_size:
            shared = f"{options.prefix}shared_expert."
            s13 = torch.cat(
                [parts.pop(f"{shared}gate_proj.weight"), parts.pop(f"{shared}up_proj.weight")]
            )
            s2 = parts.pop(f"{shared}down_proj.weight")
            s_gate = parts.pop(f"{options.prefix}shared_expert_gate.weight")
            block.shared_w13 = upload(s13.unsqueeze(0))  # (1, 2S, H)
            block.shared_w2 = upload(s2.unsqueeze(0))  # (1, H, S)
            block.shared_gate = upload_linear(s_gate)
            numel += s13.numel() + s2.numel() + s_gate.numel()
        return block, numel

    def forward(self, ops: Backend, x: Tensor) -> Tensor:
        logits = ops.linear(x, self.router)  # (T, E), in the model dtype as transformers
        weights, ids = ops.moe_route(logits, self.top_k, self.renormalize)  # (T, k) fp32, int64
        out = ops.moe_experts(x, self.w13, self.w2, weights, ids, self.activation)  # (T, H)
        if self.shared_gate is None:
            return out
        gate = ops.linear(x, self.shared_gate)  # (T, 1)
        # sigmoid(gate) and expert 0 for every token: (T, 1) fp32, (T, 1) int64.
        g, first = ops.moe_route(gate, 1, False, scoring="sigmoid")
        shared = ops.moe_experts(x, self.shared_w13, self.shared_w2, g, first, self.activation)
        return ops.add(out, shared)  # (T, H)


# ------------------------------------------------------------------------------------------
# helpers for the family declarations
# ------------------------------------------------------------------------------------------


def routed_experts(config: Any, experts_field: str) -> tuple[int, int]:
    """``(num_experts, top_k)`` from ``config.<experts_field>`` and ``num_experts_per_tok``,
    or a ValueError naming the field that makes them inconsistent."""
    experts = int(getattr(config, experts_field))
    top_k = int(config.num_experts_per_tok)
    if experts < 1:
        raise ValueError(
            f"config.{experts_field}={experts}: a mixture-of-experts layer needs at least one "
            "expert"
        )
    if top_k < 1:
        raise ValueError(
            f"config.num_experts_per_tok={top_k}: each token must be routed to at least one expert"
        )
    if top_k > experts:
        raise ValueError(
            f"config.num_experts_per_tok={top_k} is more than config.{experts_field}={experts}: "
            "a token cannot be routed to more experts than the layer has"
        )
    return experts, top_k


def size_of(config: Any, field: str) -> int:
    """``config.<field>``, a size that must be positive (a ValueError naming it otherwise)."""
    value = getattr(config, field, None)
    if value is None or int(value) < 1:
        raise ValueError(f"config.{field}={value!r} must be a positive size")
    return int(value)
