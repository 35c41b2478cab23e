"""`BlockPool`: a worker's KV blocks — reference counts, content keys, and LRU reuse of free blocks.

A block is in one of three states:

    in use       ref_count > 0                    (owned by one or more running sequences)
    cached free  ref_count == 0, has a key         (its KV is still valid: a later hit revives it)
    empty free   ref_count == 0, no key

Free blocks (cached or empty) sit in one queue, least recently freed first. `allocate` takes from
the front, evicting the key of a cached block it takes, so the prefix cache is an LRU over whatever
memory running sequences don't need. Pure bookkeeping: the KV tensors live in the model runner.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from services.common.block_keys import BlockKey


class OutOfBlocks(RuntimeError):
    """Raised by `allocate` when asked for more than `num_free`; callers probe first."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Blocks holding the longest cached prefix of `keys`. No side effects."""
        hits = []
        for key in keys:
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, num: int) -> list[int]:
        """`num` blocks with ref_count 1, taken least recently freed first (evicting their keys)."""
        if num > len(self._free):
            raise OutOfBlocks(f"asked for {num} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(num):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block (a prefix-cache hit); revives cached free blocks."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                if self.keys[block_id] is None:
                    raise ValueError(f"block {block_id} is free and holds no cached KV")
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block; at zero it joins the free queue as most recently used.
        All or nothing: a block freed more often than taken raises before anything changes."""
        block_ids = list(block_ids)
        counts: dict[int, int] = {}
        for block_id in block_ids:
            counts[block_id] = counts.get(block_id, 0) + 1
            if counts[block_id] > self.ref_counts[block_id]:
                raise ValueError(f"block {block_id} freed more often than taken")
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None

    def cache(self, block_id: int, key: BlockKey) -> None:
        """Record that `block_id` holds the full block `key`. A key cached already keeps its block."""
        if self.keys[block_id] == key or key in self.cached:
            return
        self._evict(block_id)
        self.keys[block_id] = key
        self.cached[key] = block_id

    def _evict(self, block_id: int) -> None:
        key = self.keys[block_id]
        if key is not None:
            del self.cached[key]
            self.keys[block_id] = None
