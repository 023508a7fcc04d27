"""Scheduler: token budget, chunked prefill, FIFO admission, preemption by recompute, abort.

A fake model stands in for the runner: it writes a key naming each position's whole prefix
into a simulated paged KV cache, checks that every earlier position of the sequence is there
before it "computes", and samples a token derived from the last key. Wrong block tables, a
bad prefix-cache hit or a lost token after preemption therefore show up as a wrong key or a
wrong output.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from llm_core.engine.block_manager import BlockManager
from llm_core.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from llm_core.engine.sequence import Sequence, SequenceStatus

VOCAB = 50


def prefix_keys(tokens: list[int]) -> list[int]:
    keys, key = [], 17
    for t in tokens:
        key = hash((key, t))
        keys.append(key)
    return keys


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(prefix_keys(tokens)[-1] % VOCAB)
    return tokens[len(prompt) :]


class FakeModel:
    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.slots: list[int | None] = [None] * (bm.num_blocks * bm.block_size)

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        bs = self.bm.block_size
        sampled = {}
        for item in out.scheduled:
            seq = item.seq
            assert item.num_new_tokens >= 1
            assert item.end <= seq.num_tokens
            assert len(seq.block_table) * bs >= item.end
            keys = prefix_keys(seq.token_ids[: item.end])
            for pos, key in enumerate(keys):
                block = seq.block_table[pos // bs]
                slot = block * bs + pos % bs
                if pos < item.start:
                    assert self.slots[slot] == key, f"KV of {seq!r} at position {pos} is wrong"
                else:
                    # Only a private block is ever written.
                    assert self.bm.ref_count(block) == 1
                    assert not self.bm.is_cached(block)
                    self.slots[slot] = key
            if item.produces_logits:
                sampled[seq.seq_id] = keys[-1] % VOCAB
        return sampled


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    bs = bm.block_size
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_table == []
        assert seq.num_computed_tokens == 0
    assert len(sched.running) <= sched.config.max_num_seqs
    uses: Counter[int] = Counter()
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert seq.num_computed_tokens <= min(seq.num_tokens, len(seq.block_table) * bs)
        for i, block in enumerate(seq.block_table):
            if bm.is_cached(block):
                assert (i + 1) * bs <= seq.num_computed_tokens, "a cached block must be computed"
        uses.update(seq.block_table)
    in_use = evictable = 0
    for block in range(bm.num_blocks):
        assert bm.ref_count(block) == uses[block]
        if bm.ref_count(block) > 1:
            assert bm.is_cached(block), "only full cached blocks may be shared"
        in_use += bm.ref_count(block) > 0
        evictable += bm.ref_count(block) == 0 and bm.is_cached(block)
    assert evictable == bm.num_evictable_blocks
    assert bm.num_free_blocks + bm.num_evictable_blocks + in_use == bm.num_blocks


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    prefix_caching: bool = True,
    max_model_len: int = 256,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    enable_chunked_prefill: bool = True,
) -> Scheduler:
    config = SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
    )
    return Scheduler(config, BlockManager(num_blocks, block_size, prefix_caching))


def step(sched: Scheduler, model: FakeModel) -> SchedulerOutput:
    """One engine step: schedule, run, postprocess, finish sequences at max_tokens."""
    out = sched.schedule()
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    sched.postprocess(out, model.run(out))
    for item in out.scheduled:
        if item.seq.num_output_tokens >= item.seq.max_tokens:
            sched.finish(item.seq)
    check_invariants(sched)
    return out


def run_to_completion(
    sched: Scheduler, model: FakeModel | None = None, max_steps: int = 10_000
) -> int:
    model = model or FakeModel(sched.block_manager)
    steps = 0
    while sched.has_unfinished:
        out = step(sched, model)
        assert out.ignored == []
        steps += 1
        assert steps < max_steps, "the scheduler stopped making progress"
    return steps


def assert_no_leak(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert bm.num_free_blocks + bm.num_evictable_blocks == bm.num_blocks


# ---- config and admission checks --------------------------------------------------------


def test_config_validates_itself() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_model_len=16, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(max_model_len=0)
    with pytest.raises(ValueError, match="chunked prefill"):
        SchedulerConfig(
            max_model_len=4096, max_num_batched_tokens=2048, enable_chunked_prefill=False
        )
    SchedulerConfig(max_model_len=4096, max_num_batched_tokens=2048)


def test_check_prompt_explains_limits() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, max_model_len=64)
    assert sched.check_prompt(32) is None
    too_long = sched.check_prompt(65)
    assert too_long is not None
    assert "65 tokens" in too_long and "max_model_len=64" in too_long
    assert "shorten the prompt" in too_long
    too_big = sched.check_prompt(33)
    assert too_big is not None
    assert "9 KV-cache blocks" in too_big and "8 blocks (32 tokens)" in too_big
    assert "more memory" in too_big
    assert sched.check_prompt(0) is not None


def test_sequence_rejects_empty_prompt_and_zero_budget() -> None:
    with pytest.raises(ValueError, match="empty"):
        Sequence("r", [], max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        Sequence("r", [1], max_tokens=0)


# ---- basic flow ---------------------------------------------------------------------------


def test_prefill_then_decode_one_token_per_step() -> None:
    sched = make_scheduler()
    model = FakeModel(sched.block_manager)
    seq = Sequence("a", [1, 2, 3, 4, 5], max_tokens=3)
    sched.add(seq)
    out = step(sched, model)
    assert [(s.start, s.num_new_tokens, s.produces_logits) for s in out.scheduled] == [(0, 5, True)]
    assert seq.num_output_tokens == 1
    assert seq.status is SequenceStatus.RUNNING
    out = step(sched, model)
    assert [(s.start, s.num_new_tokens) for s in out.scheduled] == [(5, 1)]
    # start and produces_logits describe the step as scheduled, even after postprocess.
    assert out.scheduled[0].produces_logits
    step(sched, model)
    assert seq.status is SequenceStatus.FINISHED
    assert seq.output_token_ids == expected_output([1, 2, 3, 4, 5], 3)
    assert not sched.has_unfinished
    assert sched.schedule().is_empty
    assert_no_leak(sched)


def test_chunked_prefill_splits_prompt_and_mixes_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    model = FakeModel(sched.block_manager)
    decoders = [Sequence(f"d{i}", [i + 1, 2], max_tokens=20) for i in range(2)]
    for seq in decoders:
        sched.add(seq)
    step(sched, model)  # both prefills fit in one step
    long = Sequence("long", list(range(1, 21)), max_tokens=2)
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        out = step(sched, model)
        by_id = {s.seq.request_id: s for s in out.scheduled}
        assert by_id["d0"].num_new_tokens == 1 and by_id["d1"].num_new_tokens == 1
        chunks.append((by_id["long"].num_new_tokens, by_id["long"].produces_logits))
        assert out.num_batched_tokens <= 8
    assert chunks == [(6, False), (6, False), (6, False), (2, True)]
    run_to_completion(sched, model)
    assert long.output_token_ids == expected_output(list(range(1, 21)), 2)
    for i, seq in enumerate(decoders):
        assert seq.output_token_ids == expected_output([i + 1, 2], 20)
    assert_no_leak(sched)


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget_in_fifo_order() -> None:
    sched = make_scheduler(
        max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False
    )
    model = FakeModel(sched.block_manager)
    sched.add(Sequence("d", [1, 2], max_tokens=5))
    step(sched, model)
    big = Sequence("big", list(range(16)), max_tokens=1)
    small = Sequence("small", [3], max_tokens=1)
    sched.add(big)
    sched.add(small)
    out = step(sched, model)
    # big needs 16 tokens but only 15 are left after the decode; small must not jump the queue.
    assert [s.seq.request_id for s in out.scheduled] == ["d"]
    run_to_completion(sched, model)
    assert big.output_token_ids == expected_output(list(range(16)), 1)
    assert_no_leak(sched)


def test_max_num_seqs_is_respected() -> None:
    sched = make_scheduler(max_num_seqs=3)
    model = FakeModel(sched.block_manager)
    seqs = [Sequence(f"r{i}", [i, i + 1], max_tokens=4) for i in range(7)]
    for seq in seqs:
        sched.add(seq)
    out = step(sched, model)
    assert [s.seq.request_id for s in out.scheduled] == ["r0", "r1", "r2"]
    assert sched.num_running == 3 and sched.num_waiting == 4
    for _ in range(3):
        step(sched, model)
    # r0..r2 finished together after 4 tokens; the next three take their slots in order.
    assert all(s.is_finished for s in seqs[:3]) and sched.num_running == 0
    out = step(sched, model)
    assert [s.seq.request_id for s in out.scheduled] == ["r3", "r4", "r5"]
    run_to_completion(sched, model)
    for i, seq in enumerate(seqs):
        assert seq.output_token_ids == expected_output([i, i + 1], 4)


def test_prefix_cache_hit_skips_computed_prompt_blocks() -> None:
    sched = make_scheduler()
    model = FakeModel(sched.block_manager)
    system = list(range(1, 13))  # 3 full blocks
    first = Sequence("first", [*system, 30], max_tokens=5)
    sched.add(first)
    step(sched, model)
    second = Sequence("second", [*system, 40, 41], max_tokens=2)
    sched.add(second)
    out = step(sched, model)
    item = next(s for s in out.scheduled if s.seq is second)
    assert (item.start, item.num_new_tokens) == (12, 2)
    assert second.num_cached_tokens == 12
    assert second.block_table[:3] == first.block_table[:3]
    run_to_completion(sched, model)
    assert second.output_token_ids == expected_output([*system, 40, 41], 2)
    assert_no_leak(sched)


# ---- preemption, abort, guards ------------------------------------------------------------


def test_preemption_recomputes_and_keeps_generated_tokens() -> None:
    # 6 blocks of 4 tokens; three sequences that each grow to 4-5 blocks cannot all stay.
    sched = make_scheduler(num_blocks=6, block_size=4, max_model_len=32)
    model = FakeModel(sched.block_manager)
    prompts = {"a": [1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9]}
    seqs = {rid: Sequence(rid, p, max_tokens=14) for rid, p in prompts.items()}
    for seq in seqs.values():
        sched.add(seq)
    preempted: list[tuple[str, list[int]]] = []
    steps = 0
    while sched.has_unfinished:
        out = step(sched, model)
        for seq in out.preempted:
            assert seq.status is SequenceStatus.WAITING
            assert seq.block_table == [] and seq.num_computed_tokens == 0
            preempted.append((seq.request_id, seq.output_token_ids))
        steps += 1
        assert steps < 500
    assert preempted, "the cache was meant to be too small for all three"
    # The most recently arrived running sequence is the victim.
    assert preempted[0][0] == "c"
    for rid, tokens_before in preempted:
        assert seqs[rid].output_token_ids[: len(tokens_before)] == tokens_before
    for rid, seq in seqs.items():
        assert seq.num_output_tokens == 14
        assert seq.output_token_ids == expected_output(prompts[rid], 14)
    assert sum(s.num_preemptions for s in seqs.values()) == len(preempted)
    assert_no_leak(sched)


def test_preempted_sequences_return_in_arrival_order_at_the_front() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=32)
    model = FakeModel(sched.block_manager)
    seqs = [Sequence(r, [i] * 4, max_tokens=8) for i, r in enumerate("abcd")]
    for seq in seqs:
        sched.add(seq)
    step(sched, model)  # a, b, c, d each take one full block: the cache is full
    assert sched.num_running == 4
    out = step(sched, model)  # every decode needs a second block
    assert [s.request_id for s in out.preempted] == ["d", "c"]
    assert [s.request_id for s in sched.waiting] == ["c", "d"]
    assert [s.seq.request_id for s in out.scheduled] == ["a", "b"]


def test_abort_frees_blocks_at_once() -> None:
    sched = make_scheduler(num_blocks=16, max_num_seqs=1)
    model = FakeModel(sched.block_manager)
    running = Sequence("run", list(range(10)), max_tokens=8)
    waiting = Sequence("wait", list(range(10)), max_tokens=8)
    sched.add(running)
    sched.add(waiting)
    step(sched, model)
    assert sched.block_manager.num_free_blocks < 16
    assert [s.seq_id for s in sched.abort("run")] == [running.seq_id]
    assert running.status is SequenceStatus.FINISHED and running.block_table == []
    assert sched.block_manager.usage == 0.0
    assert sched.abort("wait") == [waiting]
    assert sched.abort("missing") == []
    assert not sched.has_unfinished
    assert_no_leak(sched)


def test_finish_drops_a_sequence_wherever_it_is() -> None:
    sched = make_scheduler(max_num_seqs=1)
    model = FakeModel(sched.block_manager)
    first, second = Sequence("a", [1, 2, 3], max_tokens=9), Sequence("b", [4, 5], max_tokens=9)
    sched.add(first)
    sched.add(second)
    step(sched, model)
    sched.finish(second)  # still waiting: max_num_seqs=1
    sched.finish(first)
    assert first.is_finished and second.is_finished
    assert not sched.has_unfinished
    assert_no_leak(sched)


def test_abort_between_schedule_and_postprocess_is_harmless() -> None:
    sched = make_scheduler()
    model = FakeModel(sched.block_manager)
    seq = Sequence("a", [1, 2, 3], max_tokens=4)
    sched.add(seq)
    out = sched.schedule()
    sampled = model.run(out)
    sched.abort("a")
    sched.postprocess(out, sampled)
    assert seq.num_output_tokens == 0
    assert_no_leak(sched)


def test_missing_sampled_token_is_an_error() -> None:
    sched = make_scheduler()
    sched.add(Sequence("a", [1, 2, 3], max_tokens=4))
    out = sched.schedule()
    with pytest.raises(KeyError, match="no sampled token"):
        sched.postprocess(out, {})


def test_sequences_that_can_never_be_served_are_ignored_not_looped_on() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4, max_model_len=32)
    model = FakeModel(sched.block_manager)
    # The prompt fits, but its generation outgrows the whole cache (8 token slots).
    grower = Sequence("grow", [1, 2, 3, 4, 5], max_tokens=10)
    # A prompt longer than max_model_len that skipped check_prompt.
    too_long = Sequence("long", list(range(40)), max_tokens=1)
    sched.add(grower)
    sched.add(too_long)
    ignored: list[Sequence] = []
    for _ in range(20):
        out = step(sched, model)
        ignored += out.ignored
        if not sched.has_unfinished:
            break
    # too_long is dropped when it reaches the head of the queue; grower once it outgrows.
    assert ignored == [too_long, grower]
    assert all(s.status is SequenceStatus.FINISHED for s in ignored)
    # grower got as far as the cache allows: 8 tokens computed, one more sampled.
    assert grower.output_token_ids == expected_output([1, 2, 3, 4, 5], 4)
    assert_no_leak(sched)


# ---- randomized simulation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunked", "prefix_caching"), [(True, True), (False, True), (True, False)]
)
def test_random_workload_keeps_invariants(chunked: bool, prefix_caching: bool) -> None:
    rng = random.Random(1234)
    max_model_len = 48
    sched = make_scheduler(
        num_blocks=24,
        block_size=4,
        prefix_caching=prefix_caching,
        max_model_len=max_model_len,
        max_num_seqs=6,
        max_num_batched_tokens=48 if not chunked else 20,
        enable_chunked_prefill=chunked,
    )
    model = FakeModel(sched.block_manager)
    system_prompts = [
        [rng.randrange(VOCAB) for _ in range(rng.choice([4, 9, 16]))] for _ in range(3)
    ]
    requests: dict[str, tuple[list[int], Sequence]] = {}
    aborted: set[str] = set()
    preemptions = 0
    for n in range(400):
        if len(requests) < 80 and rng.random() < 0.5:
            prompt = rng.choice([[], *system_prompts]) + [
                rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))
            ]
            max_tokens = rng.randint(1, max_model_len - len(prompt))
            seq = Sequence(f"r{len(requests)}", prompt, max_tokens=max_tokens)
            assert sched.check_prompt(seq.num_tokens) is None
            requests[seq.request_id] = (prompt, seq)
            sched.add(seq)
        if requests and rng.random() < 0.02:
            rid = rng.choice(list(requests))
            if sched.abort(rid):
                aborted.add(rid)
        out = step(sched, model)
        assert out.ignored == []
        preemptions += len(out.preempted)
        if n > 200 and not sched.has_unfinished:
            break
    run_to_completion(sched, model)
    assert len(requests) == 80
    assert preemptions > 0, "the workload was meant to overflow the cache"
    if prefix_caching:
        assert sched.block_manager.prefix_cache_hits > 0
    for rid, (prompt, seq) in requests.items():
        assert seq.status is SequenceStatus.FINISHED
        if rid not in aborted:
            assert seq.output_token_ids == expected_output(prompt, seq.max_tokens)
    assert_no_leak(sched)
