"""KVBlockStore: tiers, LRU order, limits, counters, threads, and a property test over random operations."""
from __future__ import annotations

import random
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.kvstore.store import KVBlockStore, block_file_name

NS = "smollm2-135m/bf16/bs16"


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def data(i: int, size: int = 100) -> bytes:
    return bytes([i % 251]) * size


def block_files(disk_dir: Path) -> set[str]:
    return {p.name for p in disk_dir.iterdir()}


def check_invariants(store: KVBlockStore) -> None:
    """Counters agree with the tiers' contents and the budgets hold."""
    s = store.stats
    assert s.num_bytes == sum(len(d) for d in store._mem.values()) <= s.capacity_bytes
    assert s.num_blocks == len(store._mem)
    assert s.num_disk_bytes == sum(store._disk.values()) <= max(s.disk_capacity_bytes, 0)
    assert s.num_disk_blocks == len(store._disk)
    if store.disk_dir is not None:
        assert block_files(store.disk_dir) == set(store._disk)
        assert all((store.disk_dir / n).stat().st_size == size for n, size in store._disk.items())
    on_disk = {block_file_name(ns, k) for ns, k in store._mem}
    assert not on_disk & set(store._disk), "a block is in both tiers"


def test_put_get_and_longest_prefix_lookup():
    store = KVBlockStore(10_000)
    for i in (0, 1, 2, 4):
        assert store.put(NS, key(i), data(i)) is True
    assert store.get(NS, key(1)) == data(1)
    assert store.get(NS, key(3)) is None
    cases = [([], 0), ([key(0)], 1), ([key(0), key(1), key(2)], 3), ([key(0), key(1), key(2), key(3), key(4)], 3),
             ([key(3), key(4)], 0), ([key(1), key(0)], 2)]
    for keys, expected in cases:
        assert store.lookup(NS, keys) == expected, keys
    check_invariants(store)


def test_duplicate_put_keeps_the_first_block():
    store = KVBlockStore(10_000)
    assert store.put(NS, key(1), b"first")
    assert store.put(NS, key(1), b"second!") is False
    assert store.get(NS, key(1)) == b"first"
    assert store.stats.num_bytes == 5


def test_lru_eviction_order_under_a_byte_budget():
    store = KVBlockStore(300)                 # room for three 100-byte blocks
    for i in range(3):
        store.put(NS, key(i), data(i))
    store.get(NS, key(0))                     # 0 is now the most recently used; 1 the least
    store.put(NS, key(3), data(3))
    assert store.lookup(NS, [key(1)]) == 0
    assert [store.lookup(NS, [key(i)]) for i in (0, 2, 3)] == [1, 1, 1]
    store.put(NS, key(4), data(4))            # evicts 2 next
    assert store.lookup(NS, [key(2)]) == 0
    assert store.stats.num_evictions == 2
    check_invariants(store)


def test_lookup_does_not_touch_lru_order_or_counters():
    store = KVBlockStore(200)
    store.put(NS, key(0), data(0))
    store.put(NS, key(1), data(1))
    before = store.stats
    assert store.lookup(NS, [key(0)]) == 1    # must not make 0 recently used
    assert store.stats == before
    store.put(NS, key(2), data(2))
    assert store.lookup(NS, [key(0)]) == 0 and store.lookup(NS, [key(1), key(2)]) == 2


def test_spill_to_disk_and_promotion_back(tmp_path):
    store = KVBlockStore(200, tmp_path, 1000)
    for i in range(4):
        store.put(NS, key(i), data(i))
    s = store.stats
    assert (s.num_blocks, s.num_disk_blocks, s.num_evictions) == (2, 2, 0)
    assert block_files(tmp_path) == {block_file_name(NS, key(0)), block_file_name(NS, key(1))}
    assert store.lookup(NS, [key(i) for i in range(4)]) == 4
    assert store.put(NS, key(0), b"other") is False            # present on disk: kept
    assert store.get(NS, key(0)) == data(0)                    # promoted; 2 (memory LRU) spills
    assert block_files(tmp_path) == {block_file_name(NS, key(1)), block_file_name(NS, key(2))}
    assert store.stats.num_hits == 1
    check_invariants(store)


def test_disk_tier_is_an_lru_under_its_own_budget(tmp_path):
    store = KVBlockStore(100, tmp_path, 250)                   # 1 block in memory, 2 on disk
    for i in range(5):
        store.put(NS, key(i), data(i))
    present = [store.lookup(NS, [key(i)]) for i in range(5)]
    assert present == [0, 0, 1, 1, 1]                          # 0 and 1 fell off the disk tier
    assert store.stats.num_evictions == 2
    check_invariants(store)


def test_disk_tier_without_room_for_a_block_drops_it(tmp_path):
    store = KVBlockStore(100, tmp_path, 50)
    store.put(NS, key(0), data(0))
    store.put(NS, key(1), data(1))
    assert store.lookup(NS, [key(0)]) == 0 and store.stats.num_evictions == 1
    check_invariants(store)


def test_evict_from_both_tiers(tmp_path):
    store = KVBlockStore(200, tmp_path, 1000)
    for i in range(4):
        store.put(NS, key(i), data(i))
    assert store.evict(NS, [key(0), key(3), key(9)]) == 2      # one on disk, one in memory, one unknown
    assert [store.lookup(NS, [key(i)]) for i in range(4)] == [0, 1, 1, 0]
    assert store.stats.num_evictions == 0                      # explicit evictions are not capacity drops
    check_invariants(store)


def test_namespaces_are_isolated(tmp_path):
    store = KVBlockStore(1000, tmp_path, 1000)
    store.put("a", key(1), b"from a")
    assert store.put("b", key(1), b"from b") is True
    assert store.get("a", key(1)) == b"from a" and store.get("b", key(1)) == b"from b"
    assert store.evict("a", [key(1)]) == 1
    assert store.lookup("a", [key(1)]) == 0 and store.lookup("b", [key(1)]) == 1
    assert block_file_name("a", key(1)) != block_file_name("b", key(1))


@pytest.mark.parametrize("size, message", [(101, "larger than the memory capacity"), (0, "empty")])
def test_bad_blocks_are_refused(size, message):
    store = KVBlockStore(100)
    with pytest.raises(ValueError, match=message):
        store.put(NS, key(0), b"x" * size)
    assert store.stats.num_blocks == 0


def test_stats_counts():
    store = KVBlockStore(250)
    for i in range(3):
        store.put(NS, key(i), data(i))
    store.get(NS, key(2))
    store.get(NS, key(0))                                      # evicted: a miss
    store.get(NS, key(7))
    s = store.stats
    assert (s.num_blocks, s.num_bytes, s.capacity_bytes) == (2, 200, 250)
    assert (s.num_hits, s.num_misses, s.num_evictions) == (1, 2, 1)
    assert (s.num_disk_blocks, s.num_disk_bytes) == (0, 0)


def test_disk_blocks_of_an_earlier_run_are_picked_up(tmp_path):
    first = KVBlockStore(100, tmp_path, 1000)
    for i in range(3):
        first.put(NS, key(i), data(i))
    (tmp_path / (block_file_name(NS, key(9)) + ".tmp")).write_bytes(b"cut short")
    second = KVBlockStore(100, tmp_path, 1000)
    assert second.lookup(NS, [key(0), key(1), key(2)]) == 2     # block 2 was in the first run's memory
    assert second.get(NS, key(1)) == data(1)
    check_invariants(second)


@pytest.mark.parametrize("with_disk", [False, True])
def test_concurrent_writers_and_readers(tmp_path, with_disk):
    capacity = 40 * 1024
    store = KVBlockStore(capacity, tmp_path if with_disk else None, 80 * 1024 if with_disk else 0)
    num_keys = 200
    sizes = {i: 512 + 97 * i for i in range(num_keys)}         # 0.5 .. 19.8 KiB
    errors: list[str] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(400):
            i = rng.randrange(num_keys)
            store.put(NS, key(i), data(i, sizes[i]))
            if rng.random() < 0.05:
                store.evict(NS, [key(rng.randrange(num_keys))])

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(num_keys)
            got = store.get(NS, key(i))
            if got is not None and got != data(i, sizes[i]):
                errors.append(f"key {i}: wrong bytes")
            store.lookup(NS, [key(j) for j in range(i, min(i + 8, num_keys))])
            s = store.stats
            if s.num_bytes > capacity or s.num_bytes < 0:
                errors.append(f"memory bytes {s.num_bytes} outside 0..{capacity}")

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    readers = [threading.Thread(target=reader, args=(100 + n,)) for n in range(4)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    check_invariants(store)
    for (_, k), d in list(store._mem.items()):
        assert d == data(int.from_bytes(k, "big"), sizes[int.from_bytes(k, "big")])


operations = st.lists(st.tuples(st.sampled_from(["put", "get", "evict", "lookup"]), st.integers(0, 11)),
                      max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, capacity=st.integers(50, 400), disk_capacity=st.sampled_from([0, 120, 600]))
def test_any_operation_sequence_keeps_the_store_consistent(ops, capacity, disk_capacity):
    size = {i: 10 + 17 * i for i in range(12)}                 # 10 .. 197 bytes
    with tempfile.TemporaryDirectory() as tmp:
        store = KVBlockStore(capacity, Path(tmp), disk_capacity)
        for op, i in ops:
            if op == "put":
                if size[i] > capacity:
                    with pytest.raises(ValueError):
                        store.put(NS, key(i), data(i, size[i]))
                else:
                    store.put(NS, key(i), data(i, size[i]))
                    assert store.lookup(NS, [key(i)]) == 1    # a block just put is there
            elif op == "get":
                present = store.lookup(NS, [key(i)]) == 1
                got = store.get(NS, key(i))
                assert got == (data(i, size[i]) if present else None)
            elif op == "evict":
                present = store.lookup(NS, [key(i)])
                assert store.evict(NS, [key(i)]) == present
                assert store.lookup(NS, [key(i)]) == 0
            else:
                store.lookup(NS, [key(j) for j in range(i)])
            check_invariants(store)
        s = store.stats
        gets = sum(op == "get" for op, _ in ops)
        assert s.num_hits + s.num_misses == gets
