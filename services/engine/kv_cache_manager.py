"""`KVCacheManager`: blocks for sequences — probe (`can_allocate`), commit (`allocate`), `free`.

It meets the step scheduler at these calls only; "doesn't fit" (`can_allocate` is False) is what
drives preemption. Prefix hits come from `computed_blocks`: full blocks whose chained keys are
cached. A hit never covers a sequence's last token, because the model must still compute that
token to produce the next one's logits.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

from services.engine.block_pool import BlockPool
from services.engine.sequence import Sequence


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_hit_blocks = 0          # prefix-cache hits taken, over the manager's life
        self.num_queried_blocks = 0      # full blocks looked up

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks for the start of a sequence that has no KV yet. No side effects."""
        if not self.enable_prefix_caching or seq.num_computed_tokens or seq.block_ids:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        return self.pool.lookup(seq.block_keys[:max_blocks])

    def record_lookup(self, seq: Sequence, hits: Seq[int]) -> None:
        """Count a lookup for the prefix hit ratio (hits / queried full blocks)."""
        self.num_queried_blocks += (seq.num_tokens - 1) // self.block_size
        self.num_hit_blocks += len(hits)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: Seq[int] = ()) -> bool:
        """Whether `allocate(seq, num_new_tokens, hits)` would succeed. No side effects."""
        num_tokens = seq.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_new_blocks = seq.blocks_needed(num_tokens) - len(seq.block_ids) - len(hits)
        num_revived = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        return max(num_new_blocks, 0) + num_revived <= self.pool.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: Seq[int] = ()) -> None:
        """Take the prefix hits (marking their tokens computed) and enough blocks for the new tokens."""
        if not self.can_allocate(seq, num_new_tokens, hits):
            raise RuntimeError(f"{seq.request_id}: allocate without room; call can_allocate first")
        self.pool.touch(hits)
        seq.block_ids.extend(hits)
        seq.num_computed_tokens += len(hits) * self.block_size
        seq.num_cached_blocks += len(hits)
        num_new_blocks = seq.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if num_new_blocks > 0:
            seq.block_ids.extend(self.pool.allocate(num_new_blocks))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the keys of blocks that became full and computed, so later requests hit them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        keys = seq.block_keys
        for i in range(seq.num_cached_blocks, num_full):
            self.pool.cache(seq.block_ids[i], keys[i])
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (last block first, so a prefix outlives its tail). Idempotent."""
        self.pool.free(reversed(seq.block_ids))
        seq.block_ids = []
        seq.num_cached_blocks = 0
