"""`decide_many` equals the server's path (one `decide`, then Registry.reserve + record_route, per
request), for every preset, disaggregated and colocated clusters, with prefixes and with requests that
fit nowhere. The simulator routes through `decide_many`; this is what makes its routes the live ones."""
from __future__ import annotations

import random

import pytest

from services.common.cluster import InstanceSpec, NoRoute, Role, Route, RouteRequest, WorkerLoad
from services.scheduler.policies.config import load_policy
from services.scheduler.policies.instance_table import InstanceTable
from services.scheduler.policies.routing import decide, decide_many, record_route
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Registry

NOW = 50.0


def registry(roles: list[Role], seed: int) -> Registry:
    rng = random.Random(seed)
    reg = Registry(heartbeat_timeout_s=3.0)
    for i, role in enumerate(roles):
        spec = InstanceSpec(f"w{i:02d}", role, f"127.0.0.1:{1000 + i}", "m", block_size=16, max_model_len=4096)
        blocks = rng.choice([64, 256])
        load = WorkerLoad(num_running=rng.randrange(0, 8), num_waiting=rng.randrange(0, 3), num_blocks=blocks,
                          num_free_blocks=rng.randrange(0, blocks + 1), draining=rng.random() < 0.1,
                          num_waiting_tokens=rng.randrange(0, 2000))
        reg.register(spec, NOW - rng.random())
        reg.heartbeat(spec.instance_id, load, NOW - rng.random())
    return reg


def requests(n: int, seed: int) -> list[RouteRequest]:
    rng = random.Random(seed)
    prefixes = [tuple(bytes([p, b]) * 8 for b in range(rng.randrange(1, 6))) for p in range(4)]
    out = []
    for k in range(n):
        keys = prefixes[rng.randrange(4)] if rng.random() < 0.5 else ()
        out.append(RouteRequest(f"r{k}", "m", keys, num_prompt_tokens=rng.choice([16, 100, 700, 3000, 5000]),
                                max_tokens=rng.choice([1, 64, 512])))
    return out


ROLES = {
    "disaggregated": [Role.PREFILL] * 3 + [Role.DECODE] * 5,
    "colocated": [Role.BOTH] * 6,
    "mixed": [Role.PREFILL, Role.DECODE, Role.BOTH, Role.BOTH, Role.DECODE],
}


@pytest.mark.parametrize("preset", ["ferry", "load_aware", "round_robin"])
@pytest.mark.parametrize("cluster", sorted(ROLES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decide_many_equals_decide_then_reserve_per_request(preset: str, cluster: str, seed: int) -> None:
    reqs = requests(60, seed)
    live_registry, live_index = registry(ROLES[cluster], seed), PrefixIndex(64)
    policy = load_policy(preset)
    expected = []
    for ordinal, r in enumerate(reqs):                       # the server: decide, then _apply
        decision = decide(live_registry.snapshot(NOW), r, policy, live_index, ordinal=7 + ordinal)
        if isinstance(decision, Route):
            record_route(live_index, r, decision)
            decode = live_registry.get(decision.decode_id)
            live_registry.reserve(decision.decode_id, decode.spec.num_blocks_for(r.num_total_tokens))
            if not decision.is_colocated:
                prefill = live_registry.get(decision.prefill_id)
                live_registry.reserve(decision.prefill_id, prefill.spec.num_blocks_for(r.num_prompt_tokens))
        expected.append(decision)

    batch_index = PrefixIndex(64)
    got = decide_many(registry(ROLES[cluster], seed).snapshot(NOW), reqs, load_policy(preset), batch_index,
                      first_ordinal=7)
    assert got == expected
    assert any(isinstance(d, Route) for d in got)
    assert batch_index._ids_by_key == live_index._ids_by_key


def test_decide_many_reports_no_route_and_keeps_going() -> None:
    reg = registry([Role.PREFILL, Role.DECODE], seed=3)
    too_long = RouteRequest("big", "m", (), num_prompt_tokens=10_000, max_tokens=1)
    fine = RouteRequest("ok", "m", (), num_prompt_tokens=10, max_tokens=1)
    snapshot = reg.snapshot(NOW)
    for state in snapshot.instances:
        reg.mark_draining(state.instance_id, False)
    out = decide_many(reg.snapshot(NOW), [too_long, fine], load_policy("ferry"), PrefixIndex(8))
    assert isinstance(out[0], NoRoute) and "max_model_len" in out[0].reason


def test_decide_many_reserves_a_given_table_in_place_and_leaves_the_snapshot_table_alone() -> None:
    reg = registry([Role.PREFILL, Role.DECODE], seed=4)
    for state in reg.snapshot(NOW).instances:
        reg.mark_draining(state.instance_id, False)
        reg.heartbeat(state.instance_id, WorkerLoad(num_blocks=100, num_free_blocks=100), NOW)
    snapshot, policy = reg.snapshot(NOW), load_policy("ferry")
    shared = policy.tables.table_for(snapshot)
    before = shared.num_free_blocks.copy()
    mine = InstanceTable.build(snapshot.instances)
    r = RouteRequest("r", "m", (), num_prompt_tokens=160, max_tokens=16)
    decide_many(snapshot, [r], policy, PrefixIndex(8))
    assert (shared.num_free_blocks == before).all()
    decide_many(snapshot, [r], policy, PrefixIndex(8), table=mine)
    assert mine.num_free_blocks.tolist() == [90, 89]          # prefill: 160/16; decode: 176/16
    assert mine.num_queued.tolist() == [1, 1]
