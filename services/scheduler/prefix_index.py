"""An approximate, bounded index of where each prompt prefix was recently prefilled.

    block key ──▶ ids of the instances it was routed to for prefill (most recent last)

The scheduler never sees the workers' caches; it remembers its own decisions instead. After each
route the server records the request's block keys against the prefill instance, so a later request
with the same prefix can be sent where its KV is probably still cached. The index holds at most
`capacity` keys and forgets the least recently recorded first; an instance's entries are dropped
when it leaves (deregisters or goes silent), since its cache is gone or unknown.

Prefill workers also write each prompt's blocks to the kvstore, from which any prefill worker can
fetch them, so the server records the keys a second time against the pseudo-instance KVSTORE_ID;
the prefix-affinity scorer gives blocks found only there partial credit.

Keys are chained (block i's key covers the whole prefix up to block i), so a hit on key i means the
instance saw the first i+1 blocks, even if the index has since forgotten some of the earlier keys.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

KVSTORE_ID = "kvstore"      # the pseudo-instance that stands for the KV block store
MAX_INSTANCES_PER_KEY = 8   # a hot prefix may sit on several instances; remember the latest few


class PrefixIndex:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"prefix index capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids_by_key: OrderedDict[bytes, list[str]] = OrderedDict()
        self._keys_by_id: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._ids_by_key)

    def match(self, keys: Sequence[bytes]) -> dict[str, int]:
        """instance id -> number of leading blocks of `keys` it recently prefilled (its deepest hit).
        Read-only: looking up does not refresh a key's age, so routing stays a pure read."""
        depth: dict[str, int] = {}
        for i, key in enumerate(keys):
            for instance_id in self._ids_by_key.get(key, ()):
                depth[instance_id] = i + 1
        return depth

    def record(self, keys: Iterable[bytes], instance_id: str) -> None:
        """Remember that `instance_id` now holds these blocks."""
        for key in keys:
            ids = self._ids_by_key.get(key)
            if ids is None:
                ids = self._ids_by_key[key] = []
            else:
                self._ids_by_key.move_to_end(key)
                if instance_id in ids:
                    ids.remove(instance_id)
            ids.append(instance_id)
            self._keys_by_id.setdefault(instance_id, set()).add(key)
            if len(ids) > MAX_INSTANCES_PER_KEY:
                self._unlink(ids.pop(0), key)
        while len(self._ids_by_key) > self.capacity:
            old_key, old_ids = self._ids_by_key.popitem(last=False)
            for old_id in old_ids:
                self._unlink(old_id, old_key)

    def remove_instance(self, instance_id: str) -> int:
        """Forget every entry of one instance; returns how many keys named it."""
        keys = self._keys_by_id.pop(instance_id, set())
        for key in keys:
            ids = self._ids_by_key.get(key)
            if ids is None:
                continue
            ids.remove(instance_id)
            if not ids:
                del self._ids_by_key[key]
        return len(keys)

    def _unlink(self, instance_id: str, key: bytes) -> None:
        keys = self._keys_by_id.get(instance_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_by_id[instance_id]
