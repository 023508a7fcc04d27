"""Speculative decoding: cheap proposals of the next tokens, verified by the target model.

Each step, a sequence in decode proposes up to ``k`` next tokens; the target model computes
its last token and the proposals in one forward pass over the paged KV cache (a multi-token
decode), giving ``k + 1`` rows of logits. Row ``i`` is the target's distribution of the token
after proposal ``i - 1``, in the context that the proposals before it would make.

Verification is Leviathan et al.'s rejection sampling ("Fast Inference from Transformers via
Speculative Decoding", 2023) for *deterministic* proposals: both proposers here propose one
token per position (an n-gram continuation; the draft model's most likely token), a proposal
distribution ``q`` that is a point mass. Leviathan's rule accepts proposal ``x`` with
probability ``min(1, p(x) / q(x)) = p(x)`` and on rejection draws from ``norm(max(0, p - q))``,
which is ``p`` without ``x``, renormalized. Drawing ``y ~ p`` and accepting ``x`` when ``y == x``
(else emitting ``y``) is the same procedure: ``P(accept) = p(x)`` and ``y`` given ``y != x`` has
exactly that residual distribution. So the runner samples every row with the target's own
sampler (temperature, top-k/top-p/min-p, penalties over the tokens before that row, min_tokens
bans, the row's own seed), accepts the longest prefix of proposals that the draws reproduce,
and emits those draws plus the first one that differs (or the bonus draw after the last
proposal). Each emitted token is a draw from the target's distribution in its context: the
output distribution is the target's, for any sampling parameters. With a seed, draw ``j`` of a
request uses the same seed with and without speculation, so seeded requests give the same
tokens either way (up to the rounding of a different batch shape, as for any batching).

KV rollback: slots written for rejected proposals lie past ``num_computed_tokens`` and are
overwritten by the next step; blocks are freed with the sequence, and none holding a rejected
token is ever offered to the prefix cache (only blocks fully below ``num_computed_tokens``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llm_core.engine.sequence import Sequence

log = logging.getLogger("llm_core.engine")

METHODS = ("ngram", "draft_model", "mtp")
#: Most proposals per step: each is one more row of logits and one more KV slot per sequence.
MAX_SPECULATIVE_TOKENS = 32


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config``: ``{"method": "ngram", "num_speculative_tokens": k,
    "prompt_lookup_max": n, "prompt_lookup_min": m}`` or ``{"method": "draft_model",
    "model": path, "num_speculative_tokens": k}`` (``"model"`` alone implies draft_model)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str) -> SpeculativeConfig:
        """From a dict or its JSON text (the CLI's ``--speculative-config``); every bad field
        is a ValueError that names it."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"speculative_config is not valid JSON ({exc}); write e.g. "
                    '\'{"method": "ngram", "num_speculative_tokens": 4}\''
                ) from exc
        if not isinstance(value, dict):
            raise ValueError(
                f"speculative_config must be a dict (or its JSON), got {type(value).__name__}"
            )
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "model"}  # fmt: skip
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config has unknown field(s) {unknown}; known: {sorted(known)}"
            )
        method = value.get("method") or ("draft_model" if value.get("model") else None)
        if method not in METHODS:
            raise ValueError(
                f"speculative_config method {method!r} is not supported; use one of "
                f"{list(METHODS)} (a 'model' without a method means draft_model)"
            )
        if method == "mtp":
            raise ValueError(
                "speculative_config method 'mtp' needs a model that ships multi-token-"
                "prediction heads (DeepSeek-V3), and no such family is supported yet; use "
                "'ngram' or 'draft_model'"
            )
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"speculative_config num_speculative_tokens must be an integer in "
                f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}"
            )
        lo, hi = value.get("prompt_lookup_min", 1), value.get("prompt_lookup_max", 4)
        for name, n in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not _is_int(n) or n < 1:
                raise ValueError(f"speculative_config {name} must be an integer >= 1, got {n!r}")
        if lo > hi:
            raise ValueError(
                f"speculative_config prompt_lookup_min ({lo}) is larger than "
                f"prompt_lookup_max ({hi})"
            )
        model = value.get("model")
        if method == "draft_model" and not (isinstance(model, str) and model):
            raise ValueError(
                "speculative_config method 'draft_model' needs 'model': the draft model's "
                "checkpoint (a directory or a .gguf file, with the target's tokenizer)"
            )
        if method == "ngram" and model is not None:
            raise ValueError("speculative_config method 'ngram' takes no 'model'")
        return cls(method, k, hi, lo, model)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------
# proposers
# ----------------------------------------------------------------------------------------------


def ngram_propose(tokens: list[int], k: int, lookup_min: int, lookup_max: int) -> list[int]:
    """Prompt lookup: the ``k`` tokens that followed the most recent earlier occurrence of the
    sequence's last ``n`` tokens, for the largest ``n`` in ``[lookup_min, lookup_max]`` that
    occurs (vLLM's ngram proposer); ``[]`` when none does. Fewer than ``k`` when the match is
    near the end."""
    total = len(tokens)
    if k < 1 or total < lookup_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(lookup_max, total - 1), lookup_min - 1, -1):
        suffix = arr[total - n :]
        # Windows of n tokens starting at 0 .. total - n - 1 (the suffix itself excluded).
        windows = np.lib.stride_tricks.sliding_window_view(arr[: total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in arr[start : start + k]]
    return []


class NgramProposer:
    """Proposals looked up in the sequence's own tokens: no model, no KV."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, seq: Sequence, k: int) -> list[int]:
        c = self.config
        return ngram_propose(seq.token_ids, k, c.prompt_lookup_min, c.prompt_lookup_max)

    def fill(self, items: list[Any]) -> None:
        """Nothing to fill in: the proposals are the tokens themselves."""


def accept_draws(proposals: list[int], draws: list[int]) -> list[int]:
    """The tokens a verification emits: the draws up to and including the first that differs
    from its proposal (all ``k + 1`` draws when every proposal was reproduced)."""
    emitted = []
    for i, draw in enumerate(draws):
        emitted.append(draw)
        if i >= len(proposals) or draw != proposals[i]:
            break
    return emitted


@dataclass(slots=True)
class SpecStats:
    """Acceptance counters (vLLM's spec_decode metrics): verifications (``num_drafts``),
    proposals verified, proposals accepted, and accepted per proposal position."""

    k: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_pos = [0] * self.k

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for pos in range(accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals over verified ones (0 before any verification)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification: the accepted proposals plus the target's own."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
