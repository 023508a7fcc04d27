"""BlockManager: block accounting, prefix sharing by chained hashes, LRU eviction."""

from __future__ import annotations

import pytest
from llm_core.engine.block_manager import BlockManager, hash_block_tokens
from llm_core.engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], salt: str | None = None) -> Sequence:
    return Sequence("req", tokens, max_tokens=8, cache_salt=salt)


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """Allocate the whole of ``seq``, mark it computed and commit it, as one engine step would."""
    _, hit = bm.get_computed_blocks(seq)
    bm.allocate(seq, seq.num_tokens - hit)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def assert_no_leak(bm: BlockManager) -> None:
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert bm.num_free_blocks + bm.num_evictable_blocks == bm.num_blocks
    assert bm.usage == 0.0


def test_hash_is_deterministic_and_covers_parent_tokens_and_key() -> None:
    h = hash_block_tokens(None, [1, 2, 3, 4])
    assert h == hash_block_tokens(None, [1, 2, 3, 4])
    assert len(h) == 32
    assert h != hash_block_tokens(None, [1, 2, 4, 3])
    assert h != hash_block_tokens(hash_block_tokens(None, [0]), [1, 2, 3, 4])
    assert h != hash_block_tokens(None, [1, 2, 3, 4], extra_key="lora-1")
    assert hash_block_tokens(None, [1, 2, 3, 4], "a") != hash_block_tokens(None, [1, 2, 3, 4], "b")


def test_allocate_and_free_account_for_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)

    # Growing one token at a time takes a new block only when crossing a block boundary.
    seq.num_computed_tokens = 10
    bm.allocate(seq, 2)
    assert len(seq.block_table) == 3
    bm.allocate(seq, 3)
    assert len(seq.block_table) == 4

    bm.free(seq)
    assert seq.block_table == []
    # Nothing was committed, so nothing is cached: every block went back to the free list.
    assert bm.num_free_blocks == 8
    assert_no_leak(bm)


def test_allocate_beyond_capacity_is_refused() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(9)))
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 9)
    assert seq.block_table == []
    assert bm.num_free_blocks == 2


def test_commit_caches_only_full_computed_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))
    bm.allocate(seq, 10)
    seq.num_computed_tokens = 6  # a chunk of 6: only block 0 is full and computed
    bm.commit(seq)
    assert [bm.is_cached(b) for b in seq.block_table] == [True, False, False]
    seq.num_computed_tokens = 10
    bm.commit(seq)
    assert [bm.is_cached(b) for b in seq.block_table] == [True, True, False]
    bm.free(seq)
    assert bm.num_evictable_blocks == 2
    assert bm.num_free_blocks == 6
    assert_no_leak(bm)


def test_common_prefix_shares_physical_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(100, 112))  # 3 full blocks
    a = make_seq([*prefix, 1, 2])
    run_prefill(bm, a)
    assert a.num_computed_tokens == 14

    b = make_seq([*prefix, 7, 8, 9])
    blocks, num_tokens = bm.get_computed_blocks(b)
    assert blocks == a.block_table[:3]
    assert num_tokens == 12
    bm.allocate(b, b.num_tokens - num_tokens)
    assert b.num_computed_tokens == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]  # the partial block is private
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 2, 1]
    assert bm.prefix_cache_queries == 14 + 15
    assert bm.prefix_cache_hits == 12
    assert bm.prefix_cache_hit_rate == pytest.approx(12 / 29)

    bm.free(a)
    # Shared blocks stay in use by b; a's private tail goes back to the free list.
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1, 1]
    assert bm.num_evictable_blocks == 0
    bm.free(b)
    assert bm.num_evictable_blocks == 3
    assert_no_leak(bm)


def test_a_hit_never_covers_the_whole_prompt() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(12))
    a = make_seq(tokens)
    run_prefill(bm, a)
    bm.free(a)
    # The same 12 tokens again: the last block is left to compute so the step has logits.
    b = make_seq(tokens)
    blocks, num_tokens = bm.get_computed_blocks(b)
    assert num_tokens == 8
    assert len(blocks) == 2
    bm.allocate(b, b.num_tokens - num_tokens)
    assert b.num_computed_tokens == 8
    assert len(b.block_table) == 3


def test_same_block_after_a_different_prefix_does_not_match() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    block = [5, 6, 7, 8]
    a = make_seq([1, 1, 1, 1, *block, 0])
    run_prefill(bm, a)
    b = make_seq([2, 2, 2, 2, *block, 0])
    assert bm.get_computed_blocks(b) == ([], 0)
    # A different cache salt (adapter, model config) never matches either.
    c = make_seq([1, 1, 1, 1, *block, 0], salt="lora-7")
    assert bm.get_computed_blocks(c) == ([], 0)
    d = make_seq([1, 1, 1, 1, *block, 0])
    assert bm.get_computed_blocks(d) == (a.block_table[:2], 8)


def test_lookup_is_free_of_side_effects() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(9)))
    run_prefill(bm, a)
    bm.free(a)
    queries = bm.prefix_cache_queries
    b = make_seq(list(range(9)))
    bm.get_computed_blocks(b)
    bm.can_allocate(b, 1)
    assert bm.prefix_cache_queries == queries
    assert bm.num_evictable_blocks == 2
    assert all(bm.ref_count(x) == 0 for x in range(8))


def test_evicts_least_recently_used_cached_block() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a_tokens, b_tokens = [1] * 4 + [0], [2] * 4 + [0]
    for tokens in (a_tokens, b_tokens):
        seq = make_seq(tokens)
        run_prefill(bm, seq)
        bm.free(seq)
    assert bm.num_evictable_blocks == 2
    a_block = bm.get_computed_blocks(make_seq(a_tokens))[0][0]
    b_block = bm.get_computed_blocks(make_seq(b_tokens))[0][0]

    # A hit on a's block takes it off the LRU; freeing puts it back as most recently used.
    hit = make_seq([*a_tokens[:4], 9, 9])
    bm.allocate(hit, 2)
    assert hit.block_table[0] == a_block
    assert bm.ref_count(a_block) == 1
    assert bm.num_evictable_blocks == 1
    bm.free(hit)
    assert bm.num_evictable_blocks == 2

    # Free blocks go first (2), then b's block, the least recently used, then a's.
    big = make_seq([3] * 12)
    bm.allocate(big, 12)
    assert b_block in big.block_table
    assert not bm.is_cached(b_block)
    assert bm.is_cached(a_block)
    assert bm.get_computed_blocks(make_seq(b_tokens)) == ([], 0)
    assert bm.get_computed_blocks(make_seq(a_tokens)) == ([a_block], 4)
    big.num_computed_tokens = 12
    bm.allocate(big, 1)
    assert a_block in big.block_table
    assert bm.get_computed_blocks(make_seq(a_tokens)) == ([], 0)
    assert bm.num_available_blocks == 0
    bm.free(big)
    assert_no_leak(bm)


def test_free_evicts_a_sequence_tail_before_its_prefix() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    tokens = [*range(12), 99]
    a = make_seq(tokens)
    run_prefill(bm, a)  # 3 cached blocks + 1 private
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 1
    other = make_seq([50] * 8)
    bm.allocate(other, 8)  # the free block, then one eviction: a's last full block
    blocks, num_tokens = bm.get_computed_blocks(make_seq(tokens))
    assert num_tokens == 8
    assert blocks == table[:2]
    assert not bm.is_cached(table[2])


def test_can_allocate_counts_evictable_hits_as_taken() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(list(range(9)))
    run_prefill(bm, a)
    bm.free(a)
    assert (bm.num_free_blocks, bm.num_evictable_blocks) == (1, 2)
    # 2 blocks hit (both evictable), 1 new block needed, 1 left once the hits are taken.
    fits = make_seq([*range(8), 40, 41, 42, 43])
    assert bm.can_allocate(fits, 4)
    # 2 new blocks needed: 3 blocks look available, but 2 of them are the hits themselves.
    too_big = make_seq([*range(8), *range(40, 48)])
    assert not bm.can_allocate(too_big, 8)
    bm.allocate(fits, 4)
    assert fits.num_computed_tokens == 8
    assert bm.num_available_blocks == 0
    bm.free(fits)
    assert_no_leak(bm)


def test_identical_blocks_computed_twice_cache_one_copy() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(list(range(9))), make_seq(list(range(9)))
    # Both admitted before either is computed: no sharing yet, two private copies.
    bm.allocate(a, 9)
    bm.allocate(b, 9)
    assert set(a.block_table).isdisjoint(b.block_table)
    for seq in (a, b):
        seq.num_computed_tokens = 9
        bm.commit(seq)
    assert [bm.is_cached(x) for x in a.block_table] == [True, True, False]
    assert not any(bm.is_cached(x) for x in b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_evictable_blocks == 2
    assert_no_leak(bm)


def test_prefix_caching_off_never_shares() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    run_prefill(bm, a)
    b = make_seq(list(range(9)))
    assert bm.get_computed_blocks(b) == ([], 0)
    bm.allocate(b, 9)
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.prefix_cache_queries == 0
    assert_no_leak(bm)


def test_reset_prefix_cache_forgets_everything() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(9)))
    run_prefill(bm, a)
    live = make_seq(list(range(9)))
    bm.allocate(live, 1)  # shares a's 2 cached blocks
    bm.free(a)
    other = make_seq([7] * 5)
    run_prefill(bm, other)
    bm.free(other)
    assert bm.num_evictable_blocks == 1
    bm.reset_prefix_cache()
    assert bm.num_evictable_blocks == 0
    assert bm.num_free_blocks == 5  # 3 blocks stay with live
    assert bm.get_computed_blocks(make_seq(list(range(9)))) == ([], 0)
    assert bm.get_computed_blocks(make_seq([7] * 5)) == ([], 0)
    bm.free(live)  # its formerly cached blocks now go to the free list
    assert bm.num_free_blocks == 8
    assert_no_leak(bm)


def test_constructor_rejects_empty_cache() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=BS)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
