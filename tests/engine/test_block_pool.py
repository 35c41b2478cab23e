"""Property tests for the block pool and the KV cache manager: random operation sequences, invariants
checked after every step.

`BlockPool` is checked against a small model of itself (reference counts, keys, and the free queue in
least-recently-freed order); `KVCacheManager` is driven with real `Sequence`s whose prompts share
prefixes, and every block's reference count must equal the number of sequences holding it.
"""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.engine.block_pool import BlockPool, OutOfBlocks
from services.engine.kv_cache_manager import KVCacheManager
from services.engine.sampling import SamplingParams
from services.engine.sequence import Sequence

NUM_BLOCKS = 8
KEYS = [bytes([i]) * 16 for i in range(6)]     # few keys, so cache() and lookup() collide often
MACHINE_SETTINGS = settings(max_examples=200, stateful_step_count=40, deadline=None)


def pool_state(pool: BlockPool) -> tuple:
    """Everything observable about a pool (the free queue's order is checked through allocate)."""
    return (tuple(pool.ref_counts), tuple(pool.keys), dict(pool.cached),
            tuple(pool.is_free(b) for b in range(pool.num_blocks)), pool.num_free, pool.num_used)


def assert_pool_consistent(pool: BlockPool) -> None:
    for block_id, refs in enumerate(pool.ref_counts):
        assert refs >= 0, f"block {block_id} has ref count {refs}"
        assert (refs > 0) != pool.is_free(block_id), (
            f"block {block_id} (refs {refs}) must be either in use or free, not both or neither")
    assert pool.num_free + pool.num_used == pool.num_blocks
    assert pool.num_free == sum(1 for refs in pool.ref_counts if refs == 0)
    for key, block_id in pool.cached.items():
        assert pool.keys[block_id] == key, f"cached[{key.hex()}] = {block_id}, whose key is another"
    for block_id, key in enumerate(pool.keys):
        if key is not None:
            assert pool.cached.get(key) == block_id, f"block {block_id}'s key maps to another block"


class BlockPoolMachine(RuleBasedStateMachine):
    """`BlockPool` against a model: reference counts, block -> key, and the LRU free queue."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.refs = [0] * NUM_BLOCKS
        self.free_order = list(range(NUM_BLOCKS))    # least recently freed first
        self.key_of: dict[int, bytes] = {}

    def blocks(self, predicate) -> list[int]:
        return [b for b in range(NUM_BLOCKS) if predicate(b)]

    def evict(self, block_id: int) -> None:
        self.key_of.pop(block_id, None)

    @rule(num=st.integers(0, NUM_BLOCKS + 1))
    def allocate(self, num):
        if num > len(self.free_order):
            before = pool_state(self.pool)
            with pytest.raises(OutOfBlocks):
                self.pool.allocate(num)
            assert pool_state(self.pool) == before
            return
        expected = self.free_order[:num]
        assert self.pool.allocate(num) == expected, "allocate must take the least recently freed blocks"
        del self.free_order[:num]
        for block_id in expected:
            assert self.pool.keys[block_id] is None, "allocate must evict the key of a block it takes"
            self.refs[block_id] = 1
            self.evict(block_id)

    @precondition(lambda self: any(r > 0 or b in self.key_of for b, r in enumerate(self.refs)))
    @rule(data=st.data())
    def touch_cached_hit(self, data):
        block_id = data.draw(st.sampled_from(self.blocks(lambda b: self.refs[b] > 0 or b in self.key_of)))
        self.pool.touch([block_id])
        if self.refs[block_id] == 0:
            self.free_order.remove(block_id)
        self.refs[block_id] += 1

    @precondition(lambda self: any(r == 0 and b not in self.key_of for b, r in enumerate(self.refs)))
    @rule(data=st.data())
    def touch_of_an_empty_free_block_raises(self, data):
        empty_free = self.blocks(lambda b: self.refs[b] == 0 and b not in self.key_of)
        block_id = data.draw(st.sampled_from(empty_free))
        before = pool_state(self.pool)
        with pytest.raises(ValueError, match="holds no cached KV"):
            self.pool.touch([block_id])
        assert pool_state(self.pool) == before

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data())
    def free(self, data):
        block_id = data.draw(st.sampled_from(self.blocks(lambda b: self.refs[b] > 0)))
        self.pool.free([block_id])
        self.refs[block_id] -= 1
        if self.refs[block_id] == 0:
            self.free_order.append(block_id)

    @precondition(lambda self: not all(self.refs))
    @rule(data=st.data())
    def freeing_more_often_than_taken_raises(self, data):
        block_id = data.draw(st.sampled_from(self.blocks(lambda b: self.refs[b] == 0)))
        before = pool_state(self.pool)
        with pytest.raises(ValueError, match="freed more often than taken"):
            self.pool.free([block_id])
        assert pool_state(self.pool) == before

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data(), key=st.sampled_from(KEYS))
    def cache(self, data, key):
        block_id = data.draw(st.sampled_from(self.blocks(lambda b: self.refs[b] > 0)))
        self.pool.cache(block_id, key)
        if self.key_of.get(block_id) != key and key not in self.key_of.values():
            self.key_of[block_id] = key      # a key cached elsewhere already keeps its block

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=5))
    def lookup_has_no_side_effects(self, keys):
        before = pool_state(self.pool)
        hits = self.pool.lookup(keys)
        assert pool_state(self.pool) == before
        block_of = {k: b for b, k in self.key_of.items()}
        expected = []
        for key in keys:
            if key not in block_of:
                break
            expected.append(block_of[key])
        assert hits == expected

    @invariant()
    def consistent(self):
        assert_pool_consistent(self.pool)
        assert self.pool.ref_counts == self.refs
        assert [b for b in range(NUM_BLOCKS) if self.pool.keys[b] is not None] == sorted(self.key_of)
        assert all(self.pool.keys[b] == k for b, k in self.key_of.items())
        assert sorted(self.free_order) == self.blocks(self.pool.is_free)


TestBlockPoolInvariantsUnderRandomOperations = BlockPoolMachine.TestCase
TestBlockPoolInvariantsUnderRandomOperations.settings = MACHINE_SETTINGS


# ---- BlockPool: the same rules, one example each ----------------------------------------------
def test_allocate_takes_least_recently_freed_block_and_evicts_its_key():
    pool = BlockPool(4)
    a, b, _, _ = pool.allocate(4)
    pool.cache(a, KEYS[0])
    pool.cache(b, KEYS[1])
    pool.free([b])
    pool.free([a])                 # free queue: b (cached KEYS[1]), a (cached KEYS[0])
    assert pool.lookup([KEYS[1]]) == [b]
    assert pool.allocate(1) == [b]
    assert pool.lookup([KEYS[1]]) == [] and KEYS[1] not in pool.cached
    assert pool.lookup([KEYS[0]]) == [a], "the other cached free block keeps its key"


def test_touch_revives_a_cached_free_block_and_moves_it_out_of_the_free_queue():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.cache(a, KEYS[0])
    pool.free([a])
    assert pool.num_free == 2
    pool.touch(pool.lookup([KEYS[0]]))
    assert (pool.ref_counts[a], pool.num_free, pool.is_free(a)) == (1, 1, False)
    assert pool.allocate(1) != [a]


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_pool_needs_at_least_one_block(num_blocks):
    with pytest.raises(ValueError, match="num_blocks must be > 0"):
        BlockPool(num_blocks)


# ---- KVCacheManager with real sequences ---------------------------------------------------------
BLOCK_SIZE = 4
PARAMS = SamplingParams(max_tokens=64, temperature=0)


def manager_state(kv: KVCacheManager, seqs: list[Sequence]) -> tuple:
    return (pool_state(kv.pool),
            tuple((s.num_computed_tokens, tuple(s.block_ids), s.num_cached_blocks) for s in seqs))


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Sequences over a two-token vocabulary, mostly 0s (so prefixes are often shared), allocate,
    compute, cache and free blocks of a pool small enough to run out."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
        self.seqs: list[Sequence] = []
        self.num_added = 0

    @rule(prompt=st.lists(st.sampled_from([0, 0, 0, 1]), min_size=1, max_size=14))
    def add(self, prompt):
        self.seqs.append(Sequence(f"r{self.num_added}", prompt, len(prompt), PARAMS, 0, BLOCK_SIZE))
        self.num_added += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), chunk=st.integers(1, 9), sampled=st.integers(0, 1))
    def compute_a_chunk(self, data, chunk, sampled):
        """What one scheduler step does for a sequence: probe, take blocks, compute, publish keys."""
        seq = data.draw(st.sampled_from(self.seqs))
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(sampled)               # the token its previous step sampled
        hits = self.kv.computed_blocks(seq)
        assert len(hits) * BLOCK_SIZE <= seq.num_tokens - 1, "a prefix hit must not cover the last token"
        num = min(chunk, seq.num_uncomputed_tokens - len(hits) * BLOCK_SIZE)
        before = manager_state(self.kv, self.seqs)
        fits = self.kv.can_allocate(seq, num, hits)
        assert manager_state(self.kv, self.seqs) == before, "can_allocate must have no side effects"
        if not fits:
            with pytest.raises(RuntimeError, match="allocate without room"):
                self.kv.allocate(seq, num, hits)
            assert manager_state(self.kv, self.seqs) == before
            return
        self.kv.allocate(seq, num, hits)
        assert len(seq.block_ids) == seq.blocks_needed(seq.num_computed_tokens + num)
        seq.num_computed_tokens += num
        self.kv.cache_full_blocks(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free_is_idempotent(self, data):
        seq = self.seqs.pop(data.draw(st.integers(0, len(self.seqs) - 1)))
        self.kv.free(seq)
        assert seq.block_ids == []
        after_first = manager_state(self.kv, self.seqs)
        self.kv.free(seq)
        assert manager_state(self.kv, self.seqs) == after_first, "a second free must change nothing"

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def preempt_by_recompute(self, data):
        seq = data.draw(st.sampled_from(self.seqs))
        self.kv.free(seq)
        seq.reset_for_recompute()

    @invariant()
    def every_reference_is_a_sequence_holding_the_block(self):
        pool = self.kv.pool
        assert_pool_consistent(pool)
        holders = [0] * pool.num_blocks
        for seq in self.seqs:
            assert len(set(seq.block_ids)) == len(seq.block_ids), f"{seq.request_id} holds a block twice"
            for block_id in seq.block_ids:
                holders[block_id] += 1
        assert pool.ref_counts == holders, "a block's ref count must equal the sequences holding it"

    @invariant()
    def a_cached_key_names_the_tokens_its_block_holds(self):
        pool = self.kv.pool
        for seq in self.seqs:
            for i, block_id in enumerate(seq.block_ids):
                key = pool.keys[block_id]
                if key is not None:
                    assert (i + 1) * BLOCK_SIZE <= seq.num_computed_tokens, "a key on a block not yet full"
                    assert key == seq.block_keys[i], f"block {block_id} is cached under another prefix"

    def teardown(self):
        for seq in self.seqs:
            self.kv.free(seq)
        assert self.kv.num_free_blocks == self.kv.pool.num_blocks, "blocks leaked"
        assert not any(self.kv.pool.ref_counts)


TestKVCacheManagerInvariantsUnderRandomOperations = KVCacheManagerMachine.TestCase
TestKVCacheManagerInvariantsUnderRandomOperations.settings = MACHINE_SETTINGS


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence("r", list(token_ids), len(token_ids), PARAMS, 0, BLOCK_SIZE)


@pytest.mark.parametrize("prompt_len, expected_hit_blocks", [
    (1, 0), (4, 0), (5, 1), (8, 1), (9, 2), (12, 2), (13, 3),
])
def test_prefix_hits_never_cover_the_last_token(prompt_len, expected_hit_blocks):
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    tokens = list(range(prompt_len))
    first = make_seq(tokens)
    kv.allocate(first, prompt_len)
    first.num_computed_tokens = prompt_len
    kv.cache_full_blocks(first)
    assert len(kv.computed_blocks(make_seq(tokens))) == expected_hit_blocks


@pytest.mark.parametrize("num_held_elsewhere, fits", [(0, True), (1, True), (2, False)])
def test_can_allocate_counts_revived_prefix_hits_against_the_free_blocks(num_held_elsewhere, fits):
    # 4 blocks. A computes 8 tokens and is freed: its 2 blocks are free but still cached. B shares
    # those 8 tokens and has 3 more: its 2 hits leave the free queue and it needs 1 new block, 3 in all.
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_seq([0] * 8)
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    kv.free(a)
    kv.pool.allocate(num_held_elsewhere)            # takes never-used blocks first (LRU)
    b = make_seq([0] * 8 + [1, 1, 1])
    hits = kv.computed_blocks(b)
    assert len(hits) == 2 and all(kv.pool.is_free(h) for h in hits)

    assert kv.can_allocate(b, 3, hits) is fits
    if fits:
        kv.allocate(b, 3, hits)
        assert b.block_ids[:2] == hits and b.num_computed_tokens == 8


def test_free_releases_the_tail_before_the_prefix():
    """Freed last block first, so the LRU reuses a sequence's tail before its (more shareable) prefix."""
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    seq = make_seq(list(range(12)))
    kv.allocate(seq, 12)
    head, middle, tail = seq.block_ids
    kv.free(seq)
    assert kv.pool.allocate(3) == [tail, middle, head]


@pytest.mark.parametrize("chunks", [[6, 1, 1], [6, 6], [3, 3, 3, 3]],
                         ids=["decode", "two-chunks", "four-chunks"])
def test_every_block_that_becomes_full_is_published_to_the_prefix_cache(chunks):
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(list(range(sum(chunks) + 1)))
    for num in chunks:
        kv.allocate(seq, num)
        seq.num_computed_tokens += num
        kv.cache_full_blocks(seq)
    num_full = seq.num_computed_tokens // BLOCK_SIZE
    assert kv.pool.lookup(seq.block_keys[:num_full]) == seq.block_ids[:num_full]
