"""The instance registry, the prefix index and the Redis entry format (no Redis needed here)."""
from __future__ import annotations

import dataclasses

import pytest

from services.common.cluster import InstanceSpec, InstanceState, Role, WorkerLoad
from services.scheduler.persistence import decode, encode
from services.scheduler.prefix_index import MAX_INSTANCES_PER_KEY, PrefixIndex
from services.scheduler.registry import Registry

LOAD = WorkerLoad(num_running=2, num_waiting=1, num_blocks=100, num_free_blocks=40, num_cached_blocks=7,
                  num_preemptions=3)


def spec(instance_id: str = "a", role: Role = Role.DECODE, **kw) -> InstanceSpec:
    return InstanceSpec(instance_id, role, f"{instance_id}:50051", kw.pop("model", "m"), 16, 2048, **kw)


def test_register_counts_as_a_heartbeat():
    reg = Registry(heartbeat_timeout_s=3.0)
    assert reg.register(spec("a"), now=10.0) is True
    snap = reg.snapshot(now=12.0)
    assert snap.instance_ids == ("a",)
    assert snap.heartbeat_age_s(snap.instances[0]) == 2.0 and snap.is_alive(snap.instances[0])
    assert snap.instances[0].load == WorkerLoad()
    assert not reg.snapshot(now=13.5).is_alive(snap.instances[0])


def test_heartbeat_updates_load_and_time():
    reg = Registry(3.0)
    reg.register(spec("a"), now=1.0)
    assert reg.heartbeat("a", LOAD, now=5.0) is True
    assert reg.get("a") == InstanceState(spec("a"), LOAD, 5.0)
    assert reg.heartbeat("a", LOAD, now=4.0) and reg.get("a").last_heartbeat == 5.0   # never goes back


def test_heartbeat_from_unknown_id_says_so():
    reg = Registry(3.0)
    assert reg.heartbeat("ghost", LOAD, now=1.0) is False
    assert len(reg) == 0


def test_register_again_replaces_and_keeps_load_only_for_the_same_spec():
    reg = Registry(3.0)
    reg.register(spec("a"), now=1.0)
    reg.heartbeat("a", LOAD, now=2.0)
    assert reg.register(spec("a"), now=3.0) is False
    assert reg.get("a").load == LOAD and reg.get("a").last_heartbeat == 3.0
    reg.register(spec("a", model="other"), now=4.0)
    assert reg.get("a").load == WorkerLoad() and reg.get("a").spec.model == "other"


def test_deregister_is_idempotent():
    reg = Registry(3.0)
    reg.register(spec("a"), now=1.0)
    assert reg.deregister("a") is True
    assert reg.deregister("a") is False
    assert "a" not in reg and reg.snapshot(2.0).instances == ()


def test_snapshot_is_sorted_and_frozen():
    reg = Registry(3.0)
    for instance_id in ("c", "a", "b"):
        reg.register(spec(instance_id), now=1.0)
    snap = reg.snapshot(now=2.0)
    assert snap.instance_ids == ("a", "b", "c") and snap.heartbeat_timeout_s == 3.0
    reg.deregister("a")
    assert snap.instance_ids == ("a", "b", "c")          # later changes do not reach a taken snapshot
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.now = 5.0


def test_reserve_counts_a_routed_request_until_the_next_heartbeat():
    reg = Registry(3.0)
    reg.register(spec("a"), now=1.0)
    reg.heartbeat("a", LOAD, now=1.0)
    reg.reserve("a", num_blocks=30)
    reg.reserve("a", num_blocks=30)
    assert reg.get("a").load.num_waiting == LOAD.num_waiting + 2
    assert reg.get("a").load.num_free_blocks == 0                       # never negative
    reg.reserve("ghost", 1)                                             # unknown: ignored
    reg.heartbeat("a", LOAD, now=2.0)
    assert reg.get("a").load == LOAD


def test_silent_ids():
    reg = Registry(3.0)
    reg.register(spec("a"), now=1.0)
    reg.register(spec("b"), now=5.0)
    assert reg.silent_ids(now=6.0, after_s=3.0) == ["a"]
    assert reg.silent_ids(now=6.0, after_s=10.0) == []


def test_registry_refuses_a_bad_timeout():
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        Registry(0)


# --- prefix index ----------------------------------------------------------------------------------

K = [bytes([i]) * 16 for i in range(10)]


def test_index_match_gives_the_deepest_hit_per_instance():
    index = PrefixIndex(100)
    index.record(K[:4], "p1")
    index.record(K[:2], "p2")
    assert index.match(K[:6]) == {"p1": 4, "p2": 2}
    assert index.match([K[9]]) == {}


def test_index_is_bounded_lru():
    index = PrefixIndex(capacity=3)
    index.record(K[:3], "p1")
    index.record([K[0]], "p2")         # refreshes K0
    index.record([K[5]], "p1")         # evicts K1, the least recently recorded
    assert len(index) == 3
    assert index.match(K[:3]) == {"p1": 3, "p2": 1}      # K2 still counts: chained keys
    assert index.match([K[1]]) == {}


def test_index_keeps_few_instances_per_key():
    index = PrefixIndex(100)
    for i in range(MAX_INSTANCES_PER_KEY + 2):
        index.record([K[0]], f"p{i}")
    assert set(index.match([K[0]])) == {f"p{i}" for i in range(2, MAX_INSTANCES_PER_KEY + 2)}
    assert index.remove_instance("p0") == 0


def test_index_remove_instance():
    index = PrefixIndex(100)
    index.record(K[:3], "p1")
    index.record(K[:1], "p2")
    assert index.remove_instance("p1") == 3
    assert index.match(K[:3]) == {"p2": 1} and len(index) == 1
    assert index.remove_instance("p1") == 0


def test_index_match_does_not_refresh():
    index = PrefixIndex(capacity=2)
    index.record([K[0]], "p1")
    index.record([K[1]], "p1")
    index.match([K[0]])
    index.record([K[2]], "p1")
    assert index.match([K[0]]) == {}


# --- Redis entry format ----------------------------------------------------------------------------

def test_entry_round_trip():
    state = InstanceState(spec("a", Role.BOTH, metrics_url="http://a/metrics"), LOAD, 1234.5)
    assert decode(encode(state)) == state
    assert decode(encode(state).encode()) == state


@pytest.mark.parametrize("raw", ["not json", '{"v": 99}', '{"v": 1, "spec": {}}', "[]"])
def test_unreadable_entries_raise_value_error(raw):
    with pytest.raises(ValueError):
        decode(raw)


def test_a_stale_heartbeat_does_not_undo_a_drain():
    registry = Registry(heartbeat_timeout_s=3.0)
    registry.register(spec("d0"), now=0.0)
    registry.mark_draining("d0")
    registry.heartbeat("d0", WorkerLoad(num_blocks=10, num_free_blocks=10), now=1.0)   # sent before the Drain
    assert registry.get("d0").load.draining
    registry.mark_draining("d0", False)
    registry.heartbeat("d0", WorkerLoad(num_blocks=10, num_free_blocks=10, draining=True), now=2.0)  # before the cancel
    assert not registry.get("d0").load.draining
