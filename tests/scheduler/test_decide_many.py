"""The compiled routing pipeline (compiled.py, behind `decide` and `decide_many`) equals the numpy
reference (`decide_reference`) applied the server's way, one request after another with Registry.reserve
and record_route in between: for every preset and for random policies, on disaggregated, colocated and
mixed clusters, with prefixes, priorities, stale or draining instances, mixed block sizes and requests
that fit nowhere (same NoRoute text). The simulator routes through `decide_many`, so this is what makes
its routes the live ones."""
from __future__ import annotations

import random

import pytest

from services.common.cluster import (
    InstanceSpec,
    NoRoute,
    Priority,
    RequestLoad,
    RequestPhase,
    Role,
    Route,
    RouteRequest,
    WorkerLoad,
)
from services.scheduler.policies.config import SCORERS, load_policy, policy_from_mapping
from services.scheduler.policies.filters import FILTERS
from services.scheduler.policies.instance_table import InstanceTable
from services.scheduler.policies.routing import decide, decide_many, decide_reference, record_route
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Registry

NOW = 50.0


def registry(roles: list[Role], seed: int, *, mixed: bool = False) -> Registry:
    """Random loads; `mixed` adds other block sizes, context lengths, models, stale heartbeats and
    high-priority requests holding headroom."""
    rng = random.Random(seed)
    reg = Registry(heartbeat_timeout_s=3.0)
    for i, role in enumerate(roles):
        spec = InstanceSpec(f"w{(i * 7) % len(roles):02d}-{i}", role, f"127.0.0.1:{1000 + i}",
                            rng.choice(["m", "m", "other"]) if mixed else "m",
                            block_size=rng.choice([16, 32]) if mixed else 16,
                            max_model_len=rng.choice([2048, 4096, 8192]) if mixed else 4096)
        blocks = rng.choice([0, 64, 256] if mixed else [64, 256])
        requests = tuple(RequestLoad(f"x{i}-{k}", RequestPhase.DECODING, 100, 7, rng.choice(list(Priority)),
                                     max_tokens=rng.randrange(0, 300)) for k in range(rng.randrange(0, 3))) if mixed else ()
        load = WorkerLoad(num_running=rng.randrange(0, 8), num_waiting=rng.randrange(0, 3), num_blocks=blocks,
                          num_free_blocks=rng.randrange(0, blocks + 1), draining=rng.random() < 0.1,
                          num_waiting_tokens=rng.randrange(0, 2000), requests=requests)
        reg.register(spec, NOW - rng.random())
        reg.heartbeat(spec.instance_id, load, NOW - (rng.choice([0.1, 5.0]) if mixed else rng.random()))
    return reg


def requests(n: int, seed: int) -> list[RouteRequest]:
    rng = random.Random(seed)
    prefixes = [tuple(bytes([p, b]) * 8 for b in range(rng.randrange(1, 6))) for p in range(4)]
    out = []
    for k in range(n):
        keys = prefixes[rng.randrange(4)] if rng.random() < 0.5 else ()
        out.append(RouteRequest(f"r{k}", "m", keys, num_prompt_tokens=rng.choice([16, 100, 700, 3000, 5000]),
                                max_tokens=rng.choice([1, 64, 512]), priority=rng.choice(list(Priority))))
    return out


ROLES = {
    "disaggregated": [Role.PREFILL] * 3 + [Role.DECODE] * 5,
    "colocated": [Role.BOTH] * 6,
    "mixed": [Role.PREFILL, Role.DECODE, Role.BOTH, Role.BOTH, Role.DECODE],
}


def random_policy(seed: int) -> dict:
    rng = random.Random(seed)
    params = {"prefix_affinity": {"kvstore_credit": rng.random()}, "freeness": {"half_score_blocks": rng.uniform(1, 64)},
              "predicted_ttft": {"slo_s": rng.uniform(0.1, 3), "prefill_tokens_per_s": rng.uniform(1e3, 5e4),
                                 "transfer_bytes_per_s": rng.uniform(1e8, 1e10), "bytes_per_block": rng.uniform(1e5, 1e7)},
              "free_blocks": {}, "short_queue": {}}

    def profile() -> dict:
        filters = rng.sample(sorted(FILTERS), rng.randrange(0, len(FILTERS) + 1))
        scorers = [{"type": name, "weight": rng.choice([0.0, 0.5, 1.0, 2.0]), **params[name]}
                   for name in rng.sample(sorted(SCORERS), rng.randrange(0, len(SCORERS) + 1))]
        return {"filters": filters, "scorers": scorers, "picker": rng.choice(["highest", "highest", "round_robin"])}

    return {"prefill": profile(), "decode": profile(), "colocated": profile()}


def server_path(reg: Registry, reqs: list[RouteRequest], policy, index: PrefixIndex, first: int) -> list:
    """What the scheduler's server does per Route call, with the numpy reference pipeline."""
    out = []
    for ordinal, r in enumerate(reqs):
        decision = decide_reference(reg.snapshot(NOW), r, policy, index, ordinal=first + ordinal)
        assert decide(reg.snapshot(NOW), r, policy, index, ordinal=first + ordinal) == decision
        if isinstance(decision, Route):
            record_route(index, r, decision)
            decode = reg.get(decision.decode_id)
            reg.reserve(decision.decode_id, decode.spec.num_blocks_for(r.num_total_tokens))
            if not decision.is_colocated:
                prefill = reg.get(decision.prefill_id)
                reg.reserve(decision.prefill_id, prefill.spec.num_blocks_for(r.num_prompt_tokens))
        out.append(decision)
    return out


@pytest.mark.parametrize("preset", ["ferry", "load_aware", "round_robin"])
@pytest.mark.parametrize("cluster", sorted(ROLES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decide_many_equals_decide_then_reserve_per_request(preset: str, cluster: str, seed: int) -> None:
    reqs = requests(60, seed)
    live_index = PrefixIndex(64)
    expected = server_path(registry(ROLES[cluster], seed), reqs, load_policy(preset), live_index, 7)
    batch_index = PrefixIndex(64)
    got = decide_many(registry(ROLES[cluster], seed).snapshot(NOW), reqs, load_policy(preset), batch_index,
                      first_ordinal=7)
    assert got == expected
    assert any(isinstance(d, Route) for d in got)
    assert batch_index._ids_by_key == live_index._ids_by_key


@pytest.mark.parametrize("seed", range(40))
def test_compiled_pipeline_equals_the_reference_for_random_policies_and_clusters(seed: int) -> None:
    rng = random.Random(seed)
    roles = [rng.choice(list(Role)) for _ in range(rng.randrange(1, 12))]
    data = random_policy(seed)
    reqs = requests(40, seed)
    expected = server_path(registry(roles, seed, mixed=True), reqs, policy_from_mapping(data), PrefixIndex(64), 3)
    got = decide_many(registry(roles, seed, mixed=True).snapshot(NOW), reqs, policy_from_mapping(data),
                      PrefixIndex(64), first_ordinal=3)
    assert got == expected


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


def uniform_registry(num_prefill: int, num_decode: int, seed: int) -> Registry:
    """Mostly identical idle instances (the compiled pipeline skips rows equal to their neighbour), a few
    loaded ones, and one draining."""
    rng = random.Random(seed)
    reg = Registry(heartbeat_timeout_s=3.0)
    for i in range(num_prefill + num_decode):
        role = Role.PREFILL if i < num_prefill else Role.DECODE
        spec = InstanceSpec(f"u{i:03d}", role, f"127.0.0.1:{2000 + i}", "m", block_size=16, max_model_len=8192)
        busy = rng.random() < 0.15
        load = WorkerLoad(num_running=3 if busy else 0, num_waiting=rng.choice([0, 0, 1]), num_blocks=512,
                          num_free_blocks=300 if busy else 512,
                          num_waiting_tokens=500 if busy else 0, draining=i == num_prefill + 1)
        reg.register(spec, NOW)
        reg.heartbeat(spec.instance_id, load, NOW)
    return reg


@pytest.mark.parametrize("preset", ["ferry", "load_aware", "round_robin"])
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_pipeline_equals_the_reference_on_a_large_uniform_cluster(preset: str, seed: int) -> None:
    rng = random.Random(seed)
    reqs = [RouteRequest(f"q{k}", "m", (), rng.choice([100, 900, 2500]), rng.choice([16, 300]),
                         rng.choice(list(Priority))) for k in range(250)]
    expected = server_path(uniform_registry(30, 50, seed), reqs, load_policy(preset), PrefixIndex(8), 0)
    got = decide_many(uniform_registry(30, 50, seed).snapshot(NOW), reqs, load_policy(preset), PrefixIndex(8))
    assert got == expected
    assert len({d.decode_id for d in got if isinstance(d, Route)}) > 10
