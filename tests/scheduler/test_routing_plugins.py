"""The issue-4 routing plugins, table-driven: freeness and predicted-TTFT scorers, prefix affinity with
the kvstore, the priority-aware KV-room filter, the round-robin picker and the route ordinal."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.cluster import (
    ClusterSnapshot,
    InstanceSpec,
    InstanceState,
    Priority,
    RequestLoad,
    RequestPhase,
    Role,
    Route,
    RouteRequest,
    WorkerLoad,
)
from services.scheduler.policies.filters import HasKvRoom, default_filters
from services.scheduler.policies.freeness import freeness
from services.scheduler.policies.pickers import RoundRobin
from services.scheduler.policies.routing import Phase, RouteContext, RoutingPolicy, RoutingProfile, decide
from services.scheduler.policies.scorers import Freeness, PrefixAffinity
from services.scheduler.policies.ttft import PredictedTtft
from services.scheduler.prefix_index import KVSTORE_ID, PrefixIndex

NOW = 100.0
KEYS = tuple(bytes([i]) * 16 for i in range(8))


def high(max_tokens: int) -> RequestLoad:
    return RequestLoad("h", RequestPhase.DECODING, 100, 7, Priority.HIGH, 0, max_tokens)


def inst(instance_id: str = "a", role: Role = Role.DECODE, *, free: int = 100, blocks: int = 100, running: int = 0,
         waiting_tokens: int = 0, requests: tuple[RequestLoad, ...] = (), draining: bool = False) -> InstanceState:
    spec = InstanceSpec(instance_id, role, f"{instance_id}:1", "m", block_size=16, max_model_len=4096)
    load = WorkerLoad(num_running=running, num_blocks=blocks, num_free_blocks=free, draining=draining,
                      requests=requests, num_waiting_tokens=waiting_tokens)
    return InstanceState(spec, load, NOW)


def req(*, prompt: int = 64, max_tokens: int = 64, keys: tuple[bytes, ...] = (),
        priority: Priority = Priority.NORMAL) -> RouteRequest:
    return RouteRequest("r", "m", keys, prompt, max_tokens, priority)


def one(plugin_call, instance: InstanceState, phase: Phase, request: RouteRequest, depths=None) -> float:
    ctx = RouteContext(ClusterSnapshot(NOW, (instance,)), request, phase, depths or {})
    return float(np.broadcast_to(plugin_call(ctx), (1,))[0])


# --- freeness scorer: F / (F + h), F = freeness.py with this request's blocks as extra demand ---------
# decode phase: 64 prompt + 64 output tokens = 8 blocks of 16
FREENESS_CASES = [
    ("idle, 100 free: F = 92", inst(), req(), 92 / (92 + 32)),
    ("two running share the room: F = 46", inst(running=2), req(), 46 / (46 + 32)),
    ("F = h scores one half", inst(free=40), req(), 0.5),
    ("queued tokens are demand: 320 tokens = 20 blocks", inst(waiting_tokens=320), req(), 72 / (72 + 32)),
    ("headroom kept back from a normal request: 64 tokens = 4 blocks", inst(requests=(high(64),)), req(),
     88 / (88 + 32)),
    ("a high request may use the headroom", inst(requests=(high(64),)), req(priority=Priority.HIGH),
     92 / (92 + 32)),
    ("nothing left", inst(free=8), req(), 0.0),
    ("overcommitted is 0, not negative", inst(free=2), req(), 0.0),
    ("draining", inst(draining=True), req(), 0.0),
]


@pytest.mark.parametrize("instance, request_, expected", [c[1:] for c in FREENESS_CASES],
                         ids=[c[0] for c in FREENESS_CASES])
def test_freeness_scorer(instance, request_, expected):
    assert one(Freeness(half_score_blocks=32).score, instance, Phase.DECODE, request_) == pytest.approx(expected)


def test_freeness_scorer_uses_the_shared_formula():
    instance = inst(free=70, running=3, waiting_tokens=100, requests=(high(200),))
    f = freeness(instance, extra_blocks=8)
    assert one(Freeness(half_score_blocks=10).score, instance, Phase.DECODE, req()) == pytest.approx(f / (f + 10))


# --- predicted TTFT: 1 − (queue + prefill + transfer) / slo -----------------------------------------
TTFT = PredictedTtft(slo_s=1.0, prefill_tokens_per_s=1000, transfer_bytes_per_s=1000, bytes_per_block=100)
TTFT_CASES = [
    # prompt 64 tokens = 4 blocks: prefill 0.064 s, transfer 4·100/1000 = 0.4 s
    ("prefill: compute + transfer", inst(role=Role.PREFILL), Phase.PREFILL, req(), {}, 1 - 0.064 - 0.4),
    ("queue: 500 waiting tokens", inst(role=Role.PREFILL, waiting_tokens=500), Phase.PREFILL, req(), {},
     1 - 0.5 - 0.064 - 0.4),
    ("colocated: no transfer", inst(role=Role.BOTH), Phase.COLOCATED, req(), {}, 1 - 0.064),
    ("decode: no prefill there", inst(), Phase.DECODE, req(), {}, 1 - 0.4),
    ("cached blocks are not computed", inst(role=Role.BOTH), Phase.COLOCATED, req(keys=KEYS[:4]), {"a": 2},
     1 - 0.032),
    ("kvstore blocks are fetched, not computed", inst(role=Role.BOTH), Phase.COLOCATED, req(keys=KEYS[:4]),
     {"a": 1, KVSTORE_ID: 3}, 1 - 0.016),
    ("past the SLO", inst(role=Role.PREFILL, waiting_tokens=5000), Phase.PREFILL, req(), {}, 1 - 5.464),
]


@pytest.mark.parametrize("instance, phase, request_, depths, expected", [c[1:] for c in TTFT_CASES],
                         ids=[c[0] for c in TTFT_CASES])
def test_predicted_ttft(instance, phase, request_, depths, expected):
    assert one(TTFT.score, instance, phase, request_, depths) == pytest.approx(expected)


# --- prefix affinity with the kvstore ---------------------------------------------------------------
AFFINITY_CASES = [
    ("own blocks only", {"a": 4}, 0.5, 0.5),
    ("store-only blocks at half credit", {KVSTORE_ID: 8}, 0.5, 0.5),
    ("own 4 + 4 more in the store", {"a": 4, KVSTORE_ID: 8}, 0.5, (4 + 2) / 8),
    ("store shallower than own adds nothing", {"a": 6, KVSTORE_ID: 2}, 0.5, 6 / 8),
    ("credit 0 ignores the store", {KVSTORE_ID: 8}, 0.0, 0.0),
    ("credit 1 counts the store fully", {"a": 2, KVSTORE_ID: 8}, 1.0, 1.0),
]


@pytest.mark.parametrize("depths, credit, expected", [c[1:] for c in AFFINITY_CASES],
                         ids=[c[0] for c in AFFINITY_CASES])
def test_prefix_affinity_counts_the_kvstore(depths, credit, expected):
    score = one(PrefixAffinity(kvstore_credit=credit).score, inst(role=Role.PREFILL), Phase.PREFILL,
                req(keys=KEYS), depths)
    assert score == pytest.approx(expected)


# --- priority-aware KV room -------------------------------------------------------------------------
# decode needs 8 blocks; a HIGH request already there may grow by 512 tokens = 32 blocks
ROOM_CASES = [
    ("room without headroom", inst(free=8), Priority.NORMAL, True),
    ("headroom is not room for normal", inst(free=39, requests=(high(512),)), Priority.NORMAL, False),
    ("enough beyond the headroom", inst(free=40, requests=(high(512),)), Priority.NORMAL, True),
    ("nor for low", inst(free=39, requests=(high(512),)), Priority.LOW, False),
    ("high may use the headroom", inst(free=8, requests=(high(512),)), Priority.HIGH, True),
    ("high still needs its own blocks", inst(free=7, requests=(high(512),)), Priority.HIGH, False),
]


@pytest.mark.parametrize("instance, priority, kept", [c[1:] for c in ROOM_CASES], ids=[c[0] for c in ROOM_CASES])
def test_has_kv_room_keeps_high_priority_headroom(instance, priority, kept):
    assert bool(one(HasKvRoom().keep, instance, Phase.DECODE, req(priority=priority))) is kept


def test_no_route_reason_mentions_the_headroom():
    snapshot = ClusterSnapshot(NOW, (inst("d", free=20, requests=(high(512),)), inst("p", Role.PREFILL)))
    profile = RoutingProfile(default_filters(), ())
    decision = decide(snapshot, req(), RoutingPolicy(profile, profile, profile), PrefixIndex(10))
    assert "beyond the high-priority headroom" in decision.reason


# --- round robin ------------------------------------------------------------------------------------
def round_robin_policy() -> RoutingPolicy:
    profile = RoutingProfile(default_filters(), (), RoundRobin())
    return RoutingPolicy(profile, profile, profile)


@pytest.mark.parametrize("ordinal, expected", [(0, Route("p1", "d1")), (1, Route("p2", "d2")),
                                               (2, Route("p1", "d3")), (3, Route("p2", "d1"))])
def test_round_robin_follows_the_ordinal_in_id_order(ordinal, expected):
    instances = (inst("d3"), inst("p2", Role.PREFILL), inst("d1"), inst("p1", Role.PREFILL), inst("d2"))
    assert decide(ClusterSnapshot(NOW, instances), req(), round_robin_policy(), PrefixIndex(10),
                  ordinal=ordinal) == expected


def test_round_robin_skips_filtered_instances():
    instances = (inst("p1", Role.PREFILL), inst("d1"), inst("d2", draining=True), inst("d3"))
    routes = [decide(ClusterSnapshot(NOW, instances), req(), round_robin_policy(), PrefixIndex(10), ordinal=n)
              for n in range(4)]
    assert [r.decode_id for r in routes] == ["d1", "d3", "d1", "d3"]


def test_decide_is_a_function_of_its_inputs():
    snapshot = ClusterSnapshot(NOW, (inst("p1", Role.PREFILL), inst("d1"), inst("d2")))
    policy = round_robin_policy()
    assert decide(snapshot, req(), policy, PrefixIndex(10), ordinal=5) \
        == decide(snapshot, req(), policy, PrefixIndex(10), ordinal=5)
