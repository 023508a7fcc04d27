"""BlockManager: hands out the paged KV cache's blocks and shares full blocks by prefix hash.

Host-side bookkeeping only: it decides which physical block holds which tokens; the KV data
itself lives on the device and is written by the model runner through the HAL.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence as SequenceOf

from llm_core.engine.sequence import Sequence


def hash_block_tokens(
    parent_hash: bytes | None, token_ids: SequenceOf[int], extra_key: str | None = None
) -> bytes:
    """The SHA-256 digest naming one full KV block.

    It covers the block's token ids, the digest of the block before it (None for the first
    block), so equal tokens after different prefixes never match, and ``extra_key`` (an adapter
    or model-configuration name) so differently configured sequences never share KV.
    Deterministic across processes and platforms.
    """
    h = hashlib.sha256()
    h.update(b"P" + parent_hash if parent_hash is not None else b"R")
    if extra_key is not None:
        salt = extra_key.encode()
        h.update(b"S" + struct.pack("<Q", len(salt)) + salt)
    h.update(b"T" + struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
    return h.digest()


class BlockManager:
    """Allocates fixed-size KV blocks to sequences, with reference-counted prefix sharing.

    Every block is in exactly one state: free (no content worth keeping), in use (ref count
    > 0, listed in that many block tables), or evictable (ref count 0 but holding a full,
    hashed block that a later request may reuse). Free blocks are handed out first; when none
    is left, the least recently used evictable block is evicted and reused.

    Only full blocks are shared, and a full block is never written again, so sharing needs no
    copy-on-write: a sequence's last, partial block is always private to it. A block enters
    the prefix cache through :meth:`commit`, once its tokens' KV has been computed.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Ordered least recently used first; values unused.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- accounting -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks holding nothing worth keeping (evictable cached blocks not included)."""
        return len(self._free)

    @property
    def num_evictable_blocks(self) -> int:
        """Unused blocks that still hold a cached full block, reusable by eviction."""
        return len(self._evictable)

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can take: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by at least one sequence (0.0 to 1.0)."""
        return 1.0 - self.num_available_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the cache over tokens looked up (0.0 before any lookup)."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    def ref_count(self, block_id: int) -> int:
        """How many block tables list this block."""
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether this block is registered in the prefix cache under a hash."""
        return self._hashes[block_id] is not None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookup --------------------------------------------------------------

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """The cached blocks matching the longest prefix of ``seq.token_ids``, and the number of
        tokens they cover.

        Only full blocks match, and never all of the sequence's tokens: at least one token is
        left to compute so the step that finishes the prefill produces logits. A sequence with
        ``skip_prefix_cache`` (prompt logprobs need every position computed) matches nothing.
        Meant for a sequence that holds no blocks yet; it changes nothing (no reference taken,
        no statistics counted).
        """
        if not self.enable_prefix_caching or seq.skip_prefix_cache:
            return [], 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in self._block_hashes(seq, max_blocks):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    # ---- allocation ---------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether :meth:`allocate` with the same arguments would succeed right now."""
        return self._plan(seq, num_new_tokens) is not None

    def _plan(self, seq: Sequence, num_new_tokens: int) -> tuple[list[int], int] | None:
        """The prefix-cache hits :meth:`allocate` would take and the tokens they cover (none
        for a sequence that holds blocks), or None when the blocks are not there."""
        if seq.block_table:
            total = seq.num_computed_tokens + num_new_tokens
            fits = self.blocks_needed(total) - len(seq.block_table) <= self.num_available_blocks
            return ([], 0) if fits else None
        hits, num_hit_tokens = self.get_computed_blocks(seq)
        # Taking a hit on an evictable block removes it from the pool of takeable blocks.
        hits_evictable = sum(1 for b in hits if self._ref_counts[b] == 0)
        needed = self.blocks_needed(num_hit_tokens + num_new_tokens) - len(hits)
        fits = needed <= self.num_available_blocks - hits_evictable
        return (hits, num_hit_tokens) if fits else None

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq.block_table`` so tokens ``[0, num_computed_tokens + num_new_tokens)`` have
        KV slots.

        On a sequence that holds no blocks (fresh or preempted) this first takes the prefix
        cache hits and sets ``seq.num_computed_tokens`` to the tokens they cover;
        ``num_new_tokens`` counts the tokens to compute after those. Raises RuntimeError when
        the blocks are not there (check :meth:`can_allocate` first).
        """
        plan = self._plan(seq, num_new_tokens)
        if plan is None:
            raise RuntimeError(
                f"out of KV blocks: {seq!r} needs room for {num_new_tokens} more tokens, "
                f"{self.num_available_blocks} blocks available; call can_allocate() first"
            )
        if not seq.block_table:
            if seq.num_computed_tokens != 0:
                raise RuntimeError(f"{seq!r} holds no blocks but claims computed tokens")
            hits, num_hit_tokens = plan
            for block_id in hits:
                if self._ref_counts[block_id] == 0:
                    del self._evictable[block_id]
                self._ref_counts[block_id] += 1
            seq.block_table = hits
            seq.num_computed_tokens = num_hit_tokens
            seq.num_committed_blocks = len(hits)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_hit_tokens
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < needed:
            seq.block_table.append(self._take_block())

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` at once and empty its block table.

        A block still listed by another sequence stays in use. One that falls to ref count 0
        becomes evictable if it is cached, free otherwise. The sequence's last blocks are
        released first so that they, not its prefix, are the first to be evicted.
        """
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._hashes[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_committed_blocks = 0

    def commit(self, seq: Sequence) -> None:
        """Offer the blocks of ``seq`` that are now full and computed to the prefix cache.

        Call after ``seq.num_computed_tokens`` has advanced. A block whose content is already
        cached under another physical block stays private (one copy is enough).
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_committed_blocks:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_committed_blocks, num_full):
            block_id = seq.block_table[i]
            if self._hashes[block_id] is None and hashes[i] not in self._cached:
                self._hashes[block_id] = hashes[i]
                self._cached[hashes[i]] = block_id
        seq.num_committed_blocks = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (e.g. after new weights are loaded). Blocks in use stay
        with their sequences but will not be shared any more."""
        for block_id in self._evictable:
            self._free.append(block_id)
        self._evictable.clear()
        self._cached.clear()
        self._hashes = [None] * self.num_blocks

    # ---- internals ----------------------------------------------------------------------

    def _take_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block_hash = self._hashes[block_id]
            assert block_hash is not None
            del self._cached[block_hash]
            self._hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of the first ``num_blocks`` blocks of ``seq`` (all full)."""
        hashes = seq.block_hashes
        size = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            tokens = seq.token_ids[i * size : (i + 1) * size]
            hashes.append(hash_block_tokens(parent, tokens, seq.cache_salt))
        return hashes[:num_blocks]
