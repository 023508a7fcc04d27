"""The draft-model proposer of speculative decoding (llm_core.engine.speculative): a smaller
model with the target's tokenizer, run through a model runner of its own."""

from __future__ import annotations

from llm_core.engine.model_runner import ModelRunner, SeqSampling
from llm_core.engine.scheduler import ScheduledSeq, SchedulerOutput
from llm_core.engine.sequence import Sequence
from llm_core.sampling_params import SamplingParams


class DraftModelProposer:
    """A smaller model with the target's tokenizer proposes its greedy continuation.

    It has a KV cache of its own, with as many blocks as the target's and indexed by the
    target's block tables (vLLM's layout): a sequence's draft keys live in the same block ids
    as its target keys, in other tensors. ``Sequence.num_draft_computed`` counts the leading
    tokens whose draft KV is written; the scheduler resets it with the target's. Each step it
    catches up on the tokens it has not seen (the whole prompt at first, then the tokens the
    last verification emitted) and drafts ``k`` tokens greedily, the first ``k - 1`` of which
    it writes to the KV slots that the verification step then holds for the proposals.
    """

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Placeholders for ``k`` proposals (fewer near the end of the draft's context: it
        computes positions up to ``num_tokens + k - 2``), filled in by :meth:`fill` once the
        step holds their KV slots."""
        room = self.runner.model.max_position - seq.num_tokens + 1
        return [0] * max(0, min(k, room))

    def fill(self, items: list[ScheduledSeq]) -> None:
        """Fill ``seq.spec_token_ids[:item.num_spec]`` of every item with proposals."""
        greedy = SamplingParams(temperature=0.0, max_tokens=1)
        shadows: list[tuple[ScheduledSeq, Sequence]] = []
        for item in items:
            seq = item.seq
            shadow = Sequence(seq.request_id, seq.token_ids, 1)
            shadow.block_table = seq.block_table
            # The draft KV is good up to the target's sampled-but-uncomputed last token.
            shadow.num_computed_tokens = min(seq.num_draft_computed, seq.num_tokens - 1)
            shadows.append((item, shadow))
        sampling = {s.seq_id: SeqSampling(greedy, 0, []) for _, s in shadows}
        longest = max(item.num_spec for item, _ in shadows)
        for step in range(longest):
            live = [(item, s) for item, s in shadows if step < item.num_spec]
            plan = SchedulerOutput(
                [ScheduledSeq(s, s.num_uncomputed_tokens) for _, s in live], [], 0
            )
            result = self.runner.execute(plan, sampling)
            for item, shadow in live:
                token = result.sampled[shadow.seq_id][0].token_id
                shadow.num_computed_tokens = shadow.num_tokens
                shadow.append_token(token)
                item.seq.spec_token_ids[step] = token
        for item, shadow in shadows:
            # The draft wrote the sequence's tokens and all proposals but the last. Those the
            # verification rejects lie past the target's next ``num_tokens - 1``, which bounds
            # what the next step reads (above).
            item.seq.num_draft_computed = shadow.num_computed_tokens
