"""`KVBlockStore`: KV blocks by (namespace, 16-byte chained key), in memory with an optional disk tier.

    put ──► memory tier (LRU, ≤ capacity_bytes) ──spill LRU──► disk tier (LRU, ≤ disk_capacity_bytes) ──► dropped
               ▲                                                    │
               └──────────── get promotes a disk hit ◄──────────────┘
                                                                     (no disk tier: the LRU block is dropped)

A block lives in exactly one tier. The disk tier keeps one file per block, `<namespace hash>-<key hex>.kv`
under `disk_dir`, written to a `.tmp` file and renamed, so a file that exists is whole; files left by an
earlier run are picked up again (oldest first in the LRU). The disk tier is a cache: nothing is fsynced,
and one directory belongs to one store.

Pure and thread-safe: one lock guards both tiers (disk reads and writes happen under it, so callers
on an event loop should run `put`/`get`/`evict` in a thread when a disk tier is configured).
Counters: `num_hits`/`num_misses` count `get` calls; `num_evictions` counts blocks that left the store
for lack of room (explicit `evict` calls are not counted). `lookup` changes nothing, not even LRU order.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class StoreStats:
    num_blocks: int             # in memory
    num_bytes: int
    capacity_bytes: int
    num_disk_blocks: int
    num_disk_bytes: int
    disk_capacity_bytes: int
    num_hits: int
    num_misses: int
    num_evictions: int


@lru_cache(maxsize=4096)
def _namespace_tag(namespace: str) -> str:
    return hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest()


def block_file_name(namespace: str, key: bytes) -> str:
    """The disk tier's file name of one block."""
    return f"{_namespace_tag(namespace)}-{key.hex()}{SUFFIX}"


class KVBlockStore:
    def __init__(self, capacity_bytes: int, disk_dir: Path | str | None = None,
                 disk_capacity_bytes: int = 0) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        if disk_capacity_bytes < 0:
            raise ValueError(f"disk_capacity_bytes must be >= 0, got {disk_capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None and disk_capacity_bytes > 0 else None
        self.disk_capacity_bytes = disk_capacity_bytes if self.disk_dir is not None else 0
        self._lock = threading.Lock()
        self._mem: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()  # least recently used first
        self._mem_bytes = 0
        self._disk: OrderedDict[str, int] = OrderedDict()                 # file name -> size, LRU first
        self._disk_bytes = 0
        self._hits = self._misses = self._evictions = 0
        if self.disk_dir is not None:
            self._open_disk(self.disk_dir)

    @property
    def has_disk(self) -> bool:
        return self.disk_dir is not None

    def put(self, namespace: str, key: bytes, data: bytes) -> bool:
        """Store one block; False (and nothing rewritten) if it is already in either tier."""
        if not data:
            raise ValueError("block data is empty: send the block's KV bytes")
        if len(data) > self.capacity_bytes:
            raise ValueError(f"block of {len(data)} bytes is larger than the memory capacity of "
                             f"{self.capacity_bytes} bytes: raise the store's capacity or send smaller blocks")
        ident = (namespace, key)
        with self._lock:
            if ident in self._mem:
                self._mem.move_to_end(ident)
                return False
            if block_file_name(namespace, key) in self._disk:
                return False
            self._add_mem(ident, bytes(data))
            return True

    def get(self, namespace: str, key: bytes) -> bytes | None:
        """The block's bytes, or None. A disk hit moves the block back to memory."""
        ident = (namespace, key)
        with self._lock:
            data = self._mem.get(ident)
            if data is not None:
                self._mem.move_to_end(ident)
                self._hits += 1
                return data
            name = block_file_name(namespace, key)
            data = self._read_disk(name) if name in self._disk else None
            if data is None:
                self._misses += 1
                return None
            self._hits += 1
            if len(data) <= self.capacity_bytes:
                self._drop_disk(name)
                self._add_mem(ident, data)
            else:                   # left by a run with a larger memory budget: serve it from disk
                self._disk.move_to_end(name)
            return data

    def lookup(self, namespace: str, keys: Sequence[bytes]) -> int:
        """How many leading `keys` either tier holds. Changes nothing (no LRU touch, no counters)."""
        with self._lock:
            for i, key in enumerate(keys):
                if (namespace, key) not in self._mem and block_file_name(namespace, key) not in self._disk:
                    return i
            return len(keys)

    def evict(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove these blocks from both tiers; returns how many were there."""
        removed = 0
        with self._lock:
            for key in keys:
                data = self._mem.pop((namespace, key), None)
                if data is not None:
                    self._mem_bytes -= len(data)
                    removed += 1
                    continue
                name = block_file_name(namespace, key)
                if name in self._disk:
                    self._drop_disk(name)
                    removed += 1
        return removed

    @property
    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(num_blocks=len(self._mem), num_bytes=self._mem_bytes,
                              capacity_bytes=self.capacity_bytes, num_disk_blocks=len(self._disk),
                              num_disk_bytes=self._disk_bytes, disk_capacity_bytes=self.disk_capacity_bytes,
                              num_hits=self._hits, num_misses=self._misses, num_evictions=self._evictions)

    # -- internals; all called with the lock held --------------------------------------------------

    def _add_mem(self, ident: tuple[str, bytes], data: bytes) -> None:
        self._mem[ident] = data
        self._mem_bytes += len(data)
        while self._mem_bytes > self.capacity_bytes:        # spill least recently used blocks
            (namespace, key), old = self._mem.popitem(last=False)
            self._mem_bytes -= len(old)
            if not self._write_disk(block_file_name(namespace, key), old):
                self._evictions += 1

    def _write_disk(self, name: str, data: bytes) -> bool:
        if self.disk_dir is None or len(data) > self.disk_capacity_bytes:
            return False
        while self._disk and self._disk_bytes + len(data) > self.disk_capacity_bytes:
            self._drop_disk(next(iter(self._disk)))
            self._evictions += 1
        path = self.disk_dir / name
        tmp = path.with_name(name + TMP_SUFFIX)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot spill a KV block to %s (%s); dropping it", path, e)
            self._unlink(tmp)
            return False
        self._disk[name] = len(data)
        self._disk_bytes += len(data)
        return True

    def _read_disk(self, name: str) -> bytes | None:
        assert self.disk_dir is not None
        try:
            data = (self.disk_dir / name).read_bytes()
        except OSError as e:
            data, problem = None, str(e)
        else:
            problem = f"{len(data)} bytes, expected {self._disk[name]}"
        if data is None or len(data) != self._disk[name]:
            log.warning("KV block file %s is unreadable (%s); dropping it", self.disk_dir / name, problem)
            self._drop_disk(name)
            return None
        return data

    def _drop_disk(self, name: str) -> None:
        self._disk_bytes -= self._disk.pop(name)
        assert self.disk_dir is not None
        self._unlink(self.disk_dir / name)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e)

    def _open_disk(self, disk_dir: Path) -> None:
        """Create the directory; index block files of an earlier run, oldest first; trim to the budget."""
        disk_dir.mkdir(parents=True, exist_ok=True)
        found = []
        for path in disk_dir.iterdir():
            if path.name.endswith(SUFFIX + TMP_SUFFIX):
                self._unlink(path)              # a write cut short
            elif path.name.endswith(SUFFIX) and path.is_file():
                st = path.stat()
                if st.st_size == 0:
                    self._unlink(path)
                else:
                    found.append((st.st_mtime_ns, path.name, st.st_size))
        for _, name, size in sorted(found):
            self._disk[name] = size
            self._disk_bytes += size
        while self._disk_bytes > self.disk_capacity_bytes:
            self._drop_disk(next(iter(self._disk)))
        if found:
            log.info("kvstore disk tier %s: %d blocks (%d bytes) from an earlier run", disk_dir,
                     len(self._disk), self._disk_bytes)
