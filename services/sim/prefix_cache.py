"""What the simulated workers' KV caches actually hold, at trace-block granularity (Mooncake hashes):
one LRU per prefill-capable instance (capacity: its KV pool) and one for the kvstore.

The scheduler's PrefixIndex is its *guess* (its own routing decisions); these caches are the truth
the hit rate is measured on, so a wrong guess costs a recompute here as it would on real workers.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class BlockLru:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def leading_hits(self, hashes: np.ndarray, start: int = 0) -> int:
        """How many of `hashes[start:]` in a row are held (a prefix hit stops at the first miss)."""
        n = start
        for h in hashes[start:].tolist():
            if h not in self._blocks:
                break
            n += 1
        return n - start

    def insert(self, hashes: np.ndarray) -> None:
        blocks = self._blocks
        for h in hashes.tolist():
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
