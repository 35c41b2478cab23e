"""The table cache: a table updated row by row equals one built from scratch, and a change in the id
list rebuilds it."""
from __future__ import annotations

import dataclasses

import numpy as np

from services.common.cluster import (
    ClusterSnapshot,
    InstanceSpec,
    InstanceState,
    Priority,
    RequestLoad,
    RequestPhase,
    Role,
    WorkerLoad,
)
from services.scheduler.policies.instance_table import InstanceTable, TableCache


def inst(n: int, free: int = 50, num_high: int = 0) -> InstanceState:
    spec = InstanceSpec(f"i{n}", Role.DECODE if n % 2 else Role.PREFILL, "x:1", f"m{n % 3}", 16, 4096)
    requests = tuple(RequestLoad(f"r{k}", RequestPhase.DECODING, 10, 1, Priority.HIGH, k, 160)
                     for k in range(num_high))
    return InstanceState(spec, WorkerLoad(num_running=n, num_blocks=100, num_free_blocks=free,
                                          requests=requests, num_waiting_tokens=n * 16), float(n))


def assert_same(a: InstanceTable, b: InstanceTable) -> None:
    assert a.ids == b.ids
    for name in a.columns:
        assert np.array_equal(a.columns[name], b.columns[name]), name
    for model in ("m0", "m1", "m2", "other"):
        assert np.array_equal(a.model_mask(model), b.model_mask(model))


def test_row_updates_equal_a_fresh_build():
    cache = TableCache()
    states = [inst(n) for n in range(6)]
    first = cache.table_for(ClusterSnapshot(0.0, tuple(states)))
    states[2] = dataclasses.replace(inst(2, free=7, num_high=3), last_heartbeat=9.0)
    states[5] = InstanceState(dataclasses.replace(states[5].spec, model="new-model"), states[5].load, 5.0)
    second = cache.table_for(ClusterSnapshot(1.0, tuple(states)))
    assert_same(second, InstanceTable.build(states))
    assert second.high_priority_headroom[2] == 30 and second.num_free_blocks[2] == 7
    assert first.num_free_blocks[2] == 50, "the earlier table is not changed"


def test_same_instances_reuse_the_table_and_new_ids_rebuild_it():
    cache = TableCache()
    states = tuple(inst(n) for n in range(4))
    table = cache.table_for(ClusterSnapshot(0.0, states))
    assert cache.table_for(ClusterSnapshot(1.0, states)) is table
    renamed = states[:3] + (inst(9),)
    assert_same(cache.table_for(ClusterSnapshot(2.0, renamed)), InstanceTable.build(renamed))
    assert_same(cache.table_for(ClusterSnapshot(3.0, states[:2])), InstanceTable.build(states[:2]))


def test_ranks_follow_ids_whatever_the_row_order():
    table = InstanceTable.build([inst(3), inst(1), inst(2)])
    assert table.id_rank.tolist() == [2, 0, 1]
    assert table.uniform_block_size == 16
