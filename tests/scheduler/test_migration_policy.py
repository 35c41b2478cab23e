"""Migration policies, table-driven: victim order, drain, priority headroom, de-fragmentation, load
balancing, the round's capacity ledger, limits, determinism, config validation; one property test.

Block size is 16 and requests have max_tokens=0 (no growth margin) unless a case says otherwise, so
each case's arithmetic is the blocks written in it.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.cluster import (
    ClusterSnapshot,
    InstanceSpec,
    InstanceState,
    Migration,
    MigrationReason,
    Priority,
    RequestLoad,
    RequestPhase,
    Role,
    WorkerLoad,
)
from services.scheduler.policies.migration import MigrationConfig, drain, plan_migrations
from services.scheduler.policies.migration_ledger import drain_order, victim_order

NOW = 1000.0
DECODING, WAITING = RequestPhase.DECODING, RequestPhase.WAITING
HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW
DRAIN, PRIORITY = MigrationReason.DRAIN, MigrationReason.PRIORITY
DEFRAG, BALANCE = MigrationReason.DEFRAGMENTATION, MigrationReason.LOAD_BALANCE


def req(request_id: str, blocks: int = 4, *, phase: RequestPhase = DECODING, priority: Priority = NORMAL,
        arrival: int = 0, max_tokens: int = 0, tokens: int | None = None) -> RequestLoad:
    return RequestLoad(request_id, phase, num_tokens=blocks * 16 if tokens is None else tokens,
                       num_blocks=blocks, priority=priority, arrival=arrival, max_tokens=max_tokens)


def inst(instance_id: str, *requests: RequestLoad, free: int = 100, role: Role = Role.DECODE,
         model: str = "m", block_size: int = 16, draining: bool = False, age: float = 0.0) -> InstanceState:
    """Load counts follow from `requests`: WAITING ones are queued (their tokens are queued demand)."""
    waiting = [r for r in requests if r.phase is WAITING]
    load = WorkerLoad(num_running=len(requests) - len(waiting), num_waiting=len(waiting), num_blocks=200,
                      num_free_blocks=free, draining=draining, requests=requests,
                      num_waiting_tokens=sum(max(0, r.num_tokens - r.num_blocks * block_size) for r in waiting))
    spec = InstanceSpec(instance_id, role, f"{instance_id}:1", model, block_size, max_model_len=8192)
    return InstanceState(spec, load, last_heartbeat=NOW - age)


def snap(*instances: InstanceState) -> ClusterSnapshot:
    return ClusterSnapshot(now=NOW, instances=tuple(sorted(instances, key=lambda i: i.instance_id)))


def only(**switches: bool) -> MigrationConfig:
    """A config with just the named policies on."""
    off = {"drain": False, "priority": False, "defragmentation": False, "load_balance": False}
    return MigrationConfig(**(off | switches))


def rows(migrations: tuple[Migration, ...]) -> list[tuple[str, str, str, MigrationReason]]:
    return [(m.request_id, m.source_id, m.destination_id, m.reason) for m in migrations]


# --- victim order ----------------------------------------------------------------------------------

ORDER_CASES = [
    # (id, requests, victim order, drain order)
    ("last come first", [req("old", arrival=1), req("new", arrival=2)], ["new", "old"], ["new", "old"]),
    ("low before normal", [req("n", arrival=2), req("l", priority=LOW, arrival=1)], ["l", "n"], ["n", "l"]),
    ("high last / drain high first", [req("h", priority=HIGH, arrival=3), req("n", arrival=1)],
     ["n", "h"], ["h", "n"]),
    ("ties by request id", [req("b"), req("a")], ["a", "b"], ["a", "b"]),
]


@pytest.mark.parametrize("requests, expected_victims, expected_drain", [c[1:] for c in ORDER_CASES],
                         ids=[c[0] for c in ORDER_CASES])
def test_migration_victim_order(requests, expected_victims, expected_drain):
    assert [r.request_id for r in sorted(requests, key=victim_order)] == expected_victims
    assert [r.request_id for r in sorted(requests, key=drain_order)] == expected_drain


# --- drain -----------------------------------------------------------------------------------------

DRAIN_CASES = [
    # (id, instances, in_flight, expected)
    ("freest first, then spread as room fills",
     [inst("a", req("r1", arrival=1), req("r2", arrival=2)), inst("b", free=10), inst("c", free=8)], (),
     [("r2", "a", "b", DRAIN), ("r1", "a", "c", DRAIN)]),
    ("high priority gets the scarce room",
     [inst("a", req("h", priority=HIGH, arrival=1), req("l", priority=LOW, arrival=2)), inst("b", free=5)], (),
     [("h", "a", "b", DRAIN)]),
    ("a smaller request still fits after a larger one did not",
     [inst("a", req("big", 9, arrival=2), req("small", 3, arrival=1)), inst("b", free=5)], (),
     [("small", "a", "b", DRAIN)]),
    ("nothing fits anywhere", [inst("a", req("r1", 8)), inst("b", free=7)], (), []),
    ("only decoding requests move",
     [inst("a", req("d"), req("w", phase=WAITING), req("p", phase=RequestPhase.PREFILLING),
           req("m", phase=RequestPhase.MIGRATING), req("x", phase=RequestPhase.ARRIVING)), inst("b")], (),
     [("d", "a", "b", DRAIN)]),
    ("in-flight requests are skipped",
     [inst("a", req("r1", arrival=1), req("r2", arrival=2)), inst("b")], ("r2",), [("r1", "a", "b", DRAIN)]),
    ("destination's queued demand is not room", [inst("a", req("r1")), inst("b", req("w", 0, phase=WAITING,
                                                                               tokens=160), free=13)], (), []),
    ("normal victim leaves the high-priority headroom alone",
     [inst("a", req("n")), inst("b", req("h", 1, priority=HIGH, max_tokens=128), free=10)], (), []),
    ("a high victim may use the headroom (as routing lets it)",
     [inst("a", req("h1", priority=HIGH)), inst("b", req("h", 1, priority=HIGH, max_tokens=128), free=10)], (),
     [("h1", "a", "b", DRAIN)]),
    ("growth margin is reserved: 4 blocks + 64 tokens needs 8, the freest has 7",
     [inst("a", req("r1", max_tokens=64)), inst("b", free=7), inst("c", req("c1", 1), req("c2", 1), free=8)],
     (), [("r1", "a", "c", DRAIN)]),
    ("growth margin capped at growth_margin_tokens (128 = 8 blocks)",
     [inst("a", req("r1", max_tokens=10_000)), inst("b", free=12)], (), [("r1", "a", "b", DRAIN)]),
    ("unknown instance", [inst("b")], (), []),
]


@pytest.mark.parametrize("instances, in_flight, expected", [c[1:] for c in DRAIN_CASES],
                         ids=[c[0] for c in DRAIN_CASES])
def test_migration_drain(instances, in_flight, expected):
    assert rows(drain(snap(*instances), "a", MigrationConfig(), frozenset(in_flight))) == expected


INELIGIBLE_DESTINATIONS = [
    ("dead", inst("b", age=10.0)),
    ("draining", inst("b", draining=True)),
    ("other model", inst("b", model="other")),
    ("other block size", inst("b", block_size=32)),
    ("prefill only", inst("b", role=Role.PREFILL)),
    ("no room", inst("b", free=3)),
]


@pytest.mark.parametrize("destination", [c[1] for c in INELIGIBLE_DESTINATIONS],
                         ids=[c[0] for c in INELIGIBLE_DESTINATIONS])
def test_migration_skips_ineligible_destination(destination):
    """The ineligible instance is freer than the eligible one, and still not chosen."""
    instances = [inst("a", req("r1")), destination, inst("c", req("c1", 1), free=8)]
    assert rows(drain(snap(*instances), "a", MigrationConfig())) == [("r1", "a", "c", DRAIN)]


def test_migration_drain_to_a_colocated_instance():
    instances = [inst("a", req("r1"), role=Role.BOTH), inst("b", role=Role.BOTH)]
    assert rows(drain(snap(*instances), "a", MigrationConfig())) == [("r1", "a", "b", DRAIN)]


def test_migration_drain_of_a_dead_instance_is_empty():
    assert drain(snap(inst("a", req("r1"), age=10.0), inst("b")), "a", MigrationConfig()) == ()


def test_migration_drain_ignores_count_limits():
    requests = [req(f"r{i}", 1, arrival=i) for i in range(5)]
    config = MigrationConfig(max_migrations_per_round=1, max_migrations_per_instance=1)
    assert len(drain(snap(inst("a", *requests), inst("b")), "a", config)) == 5


# --- plan_migrations: each policy ------------------------------------------------------------------

PLAN_CASES = [
    # (id, instances, config, in_flight, expected)
    ("balanced cluster: nothing moves",
     [inst("a", req("r1"), free=20), inst("b", req("r2"), free=20)], MigrationConfig(), (), []),
    ("draining instance is emptied",
     [inst("a", req("r1"), draining=True), inst("b")], MigrationConfig(), (), [("r1", "a", "b", DRAIN)]),
    ("drain off: draining instance is left alone",
     [inst("a", req("r1"), draining=True), inst("b")], only(load_balance=True), (), []),
    ("dead draining instance: nothing to move",
     [inst("a", req("r1"), draining=True, age=10.0), inst("b")], MigrationConfig(), (), []),

    # priority: headroom 160 tokens = 10 blocks > 4 free → shortfall 6 = LOW's 2 + NORMAL's 4
    ("priority: low then normal move until the headroom is back",
     [inst("a", req("h", 1, priority=HIGH, max_tokens=160), req("n", 4, arrival=2),
           req("l", 2, priority=LOW, arrival=1), req("n0", 4, arrival=0), free=4), inst("b")],
     only(priority=True), (), [("l", "a", "b", PRIORITY), ("n", "a", "b", PRIORITY)]),
    ("priority: headroom within free blocks, nothing moves",
     [inst("a", req("h", 1, priority=HIGH, max_tokens=160), req("n"), free=10), inst("b")],
     only(priority=True), (), []),
    ("priority: high requests are never victims",
     [inst("a", req("h", 1, priority=HIGH, max_tokens=160), req("h2", 4, priority=HIGH), free=4), inst("b")],
     only(priority=True), (), []),

    # defragmentation: first waiting request needs 6 blocks, 2 free → shortfall 4
    ("defrag: victims leave until the first waiting request fits",
     [inst("a", req("w", 0, phase=WAITING, tokens=96, arrival=9), req("r1", 4, arrival=1),
           req("r2", 2, arrival=2), free=2), inst("b")],
     only(defragmentation=True), (), [("r2", "a", "b", DEFRAG), ("r1", "a", "b", DEFRAG)]),
    ("defrag: all or nothing when the hole cannot be made",
     [inst("a", req("w", 0, phase=WAITING, tokens=96), req("r1", 4, arrival=1), req("r2", 2, arrival=2),
           free=2), inst("b", free=3)],
     only(defragmentation=True), (), []),
    ("defrag: a waiting request that already holds its KV needs nothing",
     [inst("a", req("w", 6, phase=WAITING), req("r1"), free=0), inst("b")], only(defragmentation=True), (), []),
    ("defrag: only the first waiting request counts",
     [inst("a", req("w1", 0, phase=WAITING, tokens=16, arrival=1), req("w2", 0, phase=WAITING, tokens=960,
                                                                         arrival=2), req("r1"), free=2),
      inst("b")], only(defragmentation=True), (), []),

    # load balance: freeness a = 0/2, b = 80/1 → r2 (a 4/1, b 76/2 = 38) → r1 (a 8/1, b 72/3 = 24)
    ("balance: least free to most free while the gap passes the threshold",
     [inst("a", req("r1", arrival=1), req("r2", arrival=2), free=0), inst("b", req("b1", 1), free=80)],
     only(load_balance=True), (), [("r2", "a", "b", BALANCE), ("r1", "a", "b", BALANCE)]),
    # a = 0/2, b = 40/1 → r2 (a 4/1, b 36/2 = 18): a gap of 14 < 16, r1 stays
    ("balance: stops once the gap is under the threshold",
     [inst("a", req("r1", arrival=1), req("r2", arrival=2), free=0), inst("b", req("b1", 1), free=40)],
     only(load_balance=True), (), [("r2", "a", "b", BALANCE)]),
    ("balance: gap under the threshold",
     [inst("a", req("r1"), free=0), inst("b", req("b1", 1), free=15)], only(load_balance=True), (), []),
    ("balance: a move that only inverts the gap is not made",
     [inst("a", req("r1", 40), free=0), inst("b", req("b1", 1), free=50)], only(load_balance=True), (), []),
    ("balance: in-flight victim skipped, next one moves",
     [inst("a", req("r1", arrival=1), req("r2", arrival=2), free=0), inst("b", req("b1", 1), free=40)],
     MigrationConfig(max_migrations_per_round=1), ("r2",), [("r1", "a", "b", BALANCE)]),
    ("balance: requests under min_victim_blocks stay",
     [inst("a", req("r1", 2), req("r2", 2), free=0), inst("b", free=40)],
     MigrationConfig(min_victim_blocks=3), (), []),
    ("balance: per-instance limit",
     [inst("a", req("r1", arrival=1), req("r2", arrival=2), free=0), inst("b", req("b1", 1), free=80)],
     MigrationConfig(max_migrations_per_instance=1), (), [("r2", "a", "b", BALANCE)]),
    ("balance: per-round limit across sources",
     [inst("a", req("a1"), free=0), inst("b", req("b1"), free=1), inst("c", free=80), inst("d", free=80)],
     MigrationConfig(max_migrations_per_round=1), (), [("a1", "a", "c", BALANCE)]),
    ("balance: per-instance limit sends the next move elsewhere",
     [inst("a", req("a1"), free=0), inst("b", req("b1"), free=1), inst("c", free=80), inst("d", free=60)],
     MigrationConfig(max_migrations_per_instance=1), (),
     [("a1", "a", "c", BALANCE), ("b1", "b", "d", BALANCE)]),
    ("balance: only within one model",
     [inst("a", req("r1"), free=0), inst("b", free=80, model="other")], MigrationConfig(), (), []),
    ("everything off", [inst("a", req("r1"), draining=True), inst("b")],
     only(), (), []),
]


@pytest.mark.parametrize("instances, config, in_flight, expected", [c[1:] for c in PLAN_CASES],
                         ids=[c[0] for c in PLAN_CASES])
def test_migration_plan(instances, config, in_flight, expected):
    assert rows(plan_migrations(snap(*instances), config, frozenset(in_flight))) == expected


# --- the round's ledger and precedence -------------------------------------------------------------

def test_migration_precedence_priority_takes_the_room_defrag_wanted():
    """b has room for one 4-block victim: priority (a) comes before defrag (c), and c's defrag, unable
    to finish, moves nothing."""
    instances = [inst("a", req("h", 1, priority=HIGH, max_tokens=64), req("a1"), free=0),
                 inst("b", free=5),
                 inst("c", req("w", 0, phase=WAITING, tokens=64), req("c1"), free=0)]
    config = only(priority=True, defragmentation=True)
    assert rows(plan_migrations(snap(*instances), config)) == [("a1", "a", "b", PRIORITY)]


def test_migration_drain_comes_first_and_counts_toward_the_round():
    instances = [inst("a", req("d1", 1), draining=True), inst("b", req("b1"), free=0), inst("c", free=80)]
    config = MigrationConfig(max_migrations_per_round=1)
    assert rows(plan_migrations(snap(*instances), config)) == [("d1", "a", "c", DRAIN)]


def test_migration_destination_capacity_is_shared_across_draining_sources():
    """Two draining instances, one destination with room for one request."""
    instances = [inst("a", req("a1"), draining=True), inst("b", req("b1"), draining=True), inst("c", free=6)]
    assert rows(plan_migrations(snap(*instances), MigrationConfig())) == [("a1", "a", "c", DRAIN)]


def test_migration_destination_does_not_send_in_the_same_round():
    """h1 may use b's high-priority headroom, which leaves b short of it; b's victim leaves in the
    next round, not in this one (the blocks promised to h1 are not free until it lands)."""
    h, b1 = req("h", 1, priority=HIGH, max_tokens=64), req("b1", 2)
    h1 = req("h1", priority=HIGH)
    this_round = [inst("a", h1, draining=True), inst("b", h, b1, free=6), inst("c", free=3)]
    assert rows(plan_migrations(snap(*this_round), MigrationConfig())) == [("h1", "a", "b", DRAIN)]
    next_round = [inst("b", h, b1, h1, free=2), inst("c", free=3)]
    assert rows(plan_migrations(snap(*next_round), MigrationConfig())) == [("b1", "b", "c", PRIORITY)]


def test_migration_source_does_not_receive_in_the_same_round():
    """a's victim left, so a looks roomy again; b's victim may not count on blocks that free only when
    a1 lands on c."""
    instances = [inst("a", req("h", 1, priority=HIGH, max_tokens=64), req("a1", 8), free=0),
                 inst("b", req("h2", 1, priority=HIGH, max_tokens=64), req("b1", 4), free=2),
                 inst("c", free=8)]
    assert rows(plan_migrations(snap(*instances), MigrationConfig())) == [("a1", "a", "c", PRIORITY)]


def test_migration_destination_does_not_send_even_when_heartbeats_undercount_queued_demand():
    """b reports no queued tokens though its waiting request needs 6 blocks, so a1 lands there; b
    would then defragment itself into c within the same round, which the ledger refuses."""
    def without_queued_tokens(instance: InstanceState) -> InstanceState:
        return dataclasses.replace(instance, load=dataclasses.replace(instance.load, num_waiting_tokens=0))

    instances = [without_queued_tokens(inst("a", req("wa", 0, phase=WAITING, tokens=64), req("a1", 4), free=0)),
                 without_queued_tokens(inst("b", req("wb", 0, phase=WAITING, tokens=96), req("b1", 5), free=5)),
                 inst("c", free=5)]
    config = only(defragmentation=True)
    assert rows(plan_migrations(snap(*instances), config)) == [("a1", "a", "b", DEFRAG)]


def test_migration_plan_is_deterministic_and_ignores_instance_order():
    instances = [inst("a", req("a1", arrival=1), req("a2", arrival=2), free=0), inst("b", free=40),
                 inst("c", free=40), inst("d", req("d1"), draining=True)]
    expected = plan_migrations(snap(*instances), MigrationConfig())
    assert len(expected) >= 3
    for order in itertools.permutations(instances):
        shuffled = ClusterSnapshot(now=NOW, instances=tuple(order))
        assert plan_migrations(shuffled, MigrationConfig()) == expected


# --- config ----------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"load_balance_gap": 0.0}, "load_balance_gap"),
    ({"load_balance_gap": float("inf")}, "load_balance_gap"),
    ({"load_balance_gap": float("nan")}, "load_balance_gap"),
    ({"max_migrations_per_round": 0}, "max_migrations_per_round"),
    ({"max_migrations_per_instance": 0}, "max_migrations_per_instance"),
    ({"min_victim_blocks": -1}, "min_victim_blocks"),
    ({"growth_margin_tokens": -1}, "growth_margin_tokens"),
]


@pytest.mark.parametrize("kwargs, field_name", BAD_CONFIGS, ids=[" ".join(f"{k}={v}" for k, v in c[0].items()) for c in BAD_CONFIGS])
def test_migration_config_rejects(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        MigrationConfig(**kwargs)


# --- property: no destination over-committed, no request twice ------------------------------------

@st.composite
def clusters(draw):
    instances = []
    for i in range(draw(st.integers(2, 5))):
        requests = tuple(
            req(f"i{i}r{j}", draw(st.integers(0, 12)), arrival=j, tokens=draw(st.integers(0, 200)),
                phase=draw(st.sampled_from(list(RequestPhase))), priority=draw(st.sampled_from(list(Priority))),
                max_tokens=draw(st.integers(0, 300)))
            for j in range(draw(st.integers(0, 5))))
        instances.append(inst(f"i{i}", *requests, free=draw(st.integers(0, 40)),
                              draining=draw(st.booleans()), age=draw(st.sampled_from([0.0, 0.0, 10.0])),
                              model=draw(st.sampled_from(["m", "m", "other"]))))
    return snap(*instances)


@settings(max_examples=300, deadline=None)
@given(snapshot=clusters(), limit=st.integers(1, 4), data=st.data())
def test_migration_property_no_overcommit_no_duplicates(snapshot, limit, data):
    all_ids = sorted(r.request_id for i in snapshot.instances for r in i.load.requests)
    in_flight = frozenset(data.draw(st.lists(st.sampled_from(all_ids)) if all_ids else st.just([])))
    config = MigrationConfig(max_migrations_per_round=limit, max_migrations_per_instance=limit)
    migrations = plan_migrations(snapshot, config, in_flight)

    assert plan_migrations(snapshot, config, in_flight) == migrations
    assert len({m.request_id for m in migrations}) == len(migrations)
    assert not {m.source_id for m in migrations} & {m.destination_id for m in migrations}
    num_drained = sum(m.reason is DRAIN for m in migrations)
    assert len(migrations) <= max(num_drained, limit)
    requests = {r.request_id: (r, i) for i in snapshot.instances for r in i.load.requests}
    reserved: dict[str, int] = {}
    for m in migrations:
        victim, source = requests[m.request_id]
        destination = snapshot.get(m.destination_id)
        assert source.instance_id == m.source_id and victim.phase is DECODING
        assert m.request_id not in in_flight
        assert m.reason is DRAIN or victim.priority is not HIGH
        assert snapshot.is_alive(destination) and not destination.load.draining
        assert destination.spec.model == source.spec.model
        growth = destination.spec.num_blocks_for(min(victim.max_tokens, config.growth_margin_tokens))
        reserved[m.destination_id] = reserved.get(m.destination_id, 0) + victim.num_blocks + growth
    for destination_id, num_blocks in reserved.items():
        destination = snapshot.get(destination_id)
        queued = destination.spec.num_blocks_for(destination.load.num_waiting_tokens)
        assert num_blocks <= destination.load.num_free_blocks - queued
