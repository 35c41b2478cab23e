"""Routing policy, table-driven: each filter, each scorer, the framework's clamping/weights, `decide`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from services.common.cluster import (
    ClusterSnapshot,
    InstanceSpec,
    InstanceState,
    NoRoute,
    Role,
    Route,
    RouteRequest,
    WorkerLoad,
)
from services.scheduler.policies import default_policy
from services.scheduler.policies.filters import FitsContext, HasKvRoom, Healthy, NotDraining, ServesModel
from services.scheduler.policies.routing import (
    Phase,
    PickHighest,
    RouteContext,
    RoutingProfile,
    Weighted,
    decide,
    total_scores,
)
from services.scheduler.policies.scorers import FreeBlocks, PrefixAffinity, ShortQueue

NOW = 1000.0
TIMEOUT = 3.0
KEYS = tuple(bytes([i]) * 16 for i in range(8))


def inst(instance_id: str, role: Role = Role.DECODE, *, model: str = "m", free: int = 100, blocks: int = 100,
         running: int = 0, waiting: int = 0, age: float = 0.0, draining: bool = False,
         max_model_len: int = 4096) -> InstanceState:
    spec = InstanceSpec(instance_id, role, f"{instance_id}:1", model, block_size=16,
                        max_model_len=max_model_len)
    load = WorkerLoad(num_running=running, num_waiting=waiting, num_blocks=blocks, num_free_blocks=free,
                      draining=draining)
    return InstanceState(spec, load, last_heartbeat=NOW - age)


def snap(*instances: InstanceState) -> ClusterSnapshot:
    return ClusterSnapshot(now=NOW, instances=tuple(sorted(instances, key=lambda i: i.instance_id)),
                           heartbeat_timeout_s=TIMEOUT)


def req(*, keys: tuple[bytes, ...] = (), prompt: int = 64, max_tokens: int = 64, model: str = "m") -> RouteRequest:
    return RouteRequest("r1", model, keys, prompt, max_tokens)


def ctx(phase: Phase = Phase.DECODE, request: RouteRequest | None = None, depths=None,
        *instances: InstanceState) -> RouteContext:
    return RouteContext(snap(*instances), request or req(), phase, depths or {})


@dataclass
class FakeIndex:
    depths: dict[str, int]

    def match(self, keys):
        return self.depths


# --- filters ---------------------------------------------------------------------------------------

FILTER_CASES = [
    # (id, filter, instance, phase, request, kept)
    ("model matches", ServesModel(), inst("a"), Phase.DECODE, req(), True),
    ("model differs", ServesModel(), inst("a", model="other"), Phase.DECODE, req(), False),
    ("fresh heartbeat", Healthy(), inst("a", age=0.5), Phase.DECODE, req(), True),
    ("heartbeat at the timeout", Healthy(), inst("a", age=TIMEOUT), Phase.DECODE, req(), True),
    ("heartbeat too old", Healthy(), inst("a", age=TIMEOUT + 0.01), Phase.DECODE, req(), False),
    ("not draining", NotDraining(), inst("a"), Phase.DECODE, req(), True),
    ("draining", NotDraining(), inst("a", draining=True), Phase.DECODE, req(), False),
    ("fits context", FitsContext(), inst("a", max_model_len=128), Phase.DECODE, req(), True),
    ("prompt+output over context", FitsContext(), inst("a", max_model_len=127), Phase.DECODE, req(), False),
    ("prefill needs only the prompt", FitsContext(), inst("a", max_model_len=64), Phase.PREFILL, req(), True),
    # 64+64 tokens = 8 blocks of 16
    ("room for prompt+output", HasKvRoom(), inst("a", free=8), Phase.DECODE, req(), True),
    ("one block short", HasKvRoom(), inst("a", free=7), Phase.DECODE, req(), False),
    ("colocated needs prompt+output", HasKvRoom(), inst("a", Role.BOTH, free=7), Phase.COLOCATED, req(), False),
    ("prefill needs prompt blocks", HasKvRoom(), inst("a", Role.PREFILL, free=4), Phase.PREFILL, req(), True),
    ("partial block counts", HasKvRoom(), inst("a", free=8), Phase.DECODE, req(prompt=65), False),
    ("long output: room for the first 128 tokens", HasKvRoom(), inst("a", free=12), Phase.DECODE,
     req(max_tokens=8000), True),
    ("long output: one block short of the headroom", HasKvRoom(), inst("a", free=11), Phase.DECODE,
     req(max_tokens=8000), False),
    ("no heartbeat yet: pool unknown", HasKvRoom(), inst("a", free=0, blocks=0), Phase.PREFILL,
     req(prompt=0, max_tokens=0), False),
]


@pytest.mark.parametrize("f, instance, phase, request_, kept", [c[1:] for c in FILTER_CASES],
                         ids=[c[0] for c in FILTER_CASES])
def test_filter(f, instance, phase, request_, kept):
    assert bool(np.broadcast_to(f.keep(ctx(phase, request_, None, instance)), (1,))[0]) is kept


# --- scorers ---------------------------------------------------------------------------------------

SCORER_CASES = [
    # (id, scorer, instance, request, depths, score)
    ("no keys: no affinity", PrefixAffinity(), inst("a"), req(), {"a": 3}, 0.0),
    ("never routed here", PrefixAffinity(), inst("a"), req(keys=KEYS), {"b": 8}, 0.0),
    ("half the prefix", PrefixAffinity(), inst("a"), req(keys=KEYS), {"a": 4}, 0.5),
    ("whole prefix", PrefixAffinity(), inst("a"), req(keys=KEYS), {"a": 8}, 1.0),
    ("all blocks free", FreeBlocks(), inst("a", free=100), req(), {}, 1.0),
    ("quarter free", FreeBlocks(), inst("a", free=25), req(), {}, 0.25),
    ("pool unknown", FreeBlocks(), inst("a", free=0, blocks=0), req(), {}, 0.0),
    ("idle", ShortQueue(), inst("a"), req(), {}, 1.0),
    ("one running", ShortQueue(), inst("a", running=1), req(), {}, 0.5),
    ("running and waiting", ShortQueue(), inst("a", running=2, waiting=1), req(), {}, 0.25),
]


@pytest.mark.parametrize("scorer, instance, request_, depths, expected", [c[1:] for c in SCORER_CASES],
                         ids=[c[0] for c in SCORER_CASES])
def test_scorer(scorer, instance, request_, depths, expected):
    scores = scorer.score(ctx(Phase.PREFILL, request_, depths, instance))
    assert np.broadcast_to(scores, (1,))[0] == pytest.approx(expected)


@dataclass(frozen=True)
class Const:
    value: float
    name = "const"

    def score(self, ctx):
        return np.full(len(ctx.table), self.value)


@pytest.mark.parametrize("raw, clamped", [(5.0, 1.0), (-2.0, 0.0), (math.nan, 0.0), (0.3, 0.3)])
def test_framework_clamps_scores(raw, clamped):
    a = inst("a")
    assert total_scores(ctx(Phase.DECODE, None, None, a),
                        RoutingProfile((), (Weighted(Const(raw), 1.0),)))[0] == pytest.approx(clamped)


def test_total_score_is_the_weighted_mean():
    a = inst("a")
    profile = RoutingProfile((), (Weighted(Const(1.0), 3.0), Weighted(Const(0.0), 1.0)))
    assert total_scores(ctx(Phase.DECODE, None, None, a), profile)[0] == pytest.approx(0.75)


def test_negative_weight_is_refused():
    with pytest.raises(ValueError, match="weight"):
        RoutingProfile((), (Weighted(Const(1.0), -1.0),))


def test_pick_breaks_ties_by_instance_id():
    c = ctx(Phase.DECODE, None, None, inst("b"), inst("a"), inst("0"))   # rows in id order: 0, a, b
    rows = np.array([2, 1, 0])
    assert c.table.ids[PickHighest().pick(c, rows, np.array([0.5, 0.5, 0.4]))] == "a"


# --- decide ----------------------------------------------------------------------------------------

P, D, B = Role.PREFILL, Role.DECODE, Role.BOTH

DECIDE_CASES = [
    # (id, instances, request, prefix depths, expected Route or a NoRoute reason fragment)
    ("decode: most free blocks", [inst("p1", P), inst("d1", free=20), inst("d2", free=80)], req(), {},
     Route("p1", "d2")),
    ("decode: shorter batch", [inst("p1", P), inst("d1", running=3), inst("d2", running=1)], req(), {},
     Route("p1", "d2")),
    ("decode: tie goes to the smaller id", [inst("p1", P), inst("d2"), inst("d1")], req(), {}, Route("p1", "d1")),
    ("unhealthy decode skipped", [inst("p1", P), inst("d1", free=20), inst("d2", age=TIMEOUT + 1)], req(), {},
     Route("p1", "d1")),
    ("draining decode skipped", [inst("p1", P), inst("d1", free=20), inst("d2", draining=True)], req(), {},
     Route("p1", "d1")),
    ("other model skipped", [inst("p1", P), inst("d1", free=20), inst("d2", model="x")], req(), {},
     Route("p1", "d1")),
    ("decode without room skipped", [inst("p1", P), inst("d1", free=20, blocks=200), inst("d2", free=7, blocks=7)],
     req(), {}, Route("p1", "d1")),
    ("prefill: affinity beats load", [inst("p1", P), inst("p2", P, running=2, waiting=2), inst("d1")],
     req(keys=KEYS), {"p2": 8}, Route("p2", "d1")),
    ("prefill: a short hit does not beat load", [inst("p1", P), inst("p2", P, running=4), inst("d1")],
     req(keys=KEYS), {"p2": 1}, Route("p1", "d1")),
    ("prefill: no hits, least loaded", [inst("p1", P, waiting=3), inst("p2", P), inst("d1")], req(keys=KEYS), {},
     Route("p2", "d1")),
    ("prefill: deeper hit wins", [inst("p1", P), inst("p2", P), inst("d1")], req(keys=KEYS), {"p1": 3, "p2": 6},
     Route("p2", "d1")),
    ("colocated only", [inst("b1", B, free=30), inst("b2", B, free=90)], req(), {}, Route("b2", "b2")),
    ("colocated: affinity", [inst("b1", B), inst("b2", B, running=3)], req(keys=KEYS), {"b2": 8},
     Route("b2", "b2")),
    ("dedicated instances preferred", [inst("a-both", B, running=5), inst("d1"), inst("p1", P)], req(), {},
     Route("p1", "d1")),
    ("dedicated ones unhealthy: colocated", [inst("b1", B), inst("d1", age=9), inst("p1", P, age=9)], req(), {},
     Route("b1", "b1")),
    ("BOTH decodes for a lone prefill", [inst("b1", B), inst("p1", P)], req(), {}, Route("b1", "b1")),
    ("empty cluster", [], req(), {}, "no prefill instance for model 'm': no instance with role PREFILL or BOTH"),
    ("no decode role", [inst("p1", P)], req(), {}, "no decode instance for model 'm': no instance with role DECODE"),
    ("all decode silent", [inst("p1", P), inst("d1", age=5), inst("d2", age=4)], req(), {},
     "no decode instance for model 'm': of 2 candidate(s), none is healthy"),
    ("all decode draining", [inst("p1", P), inst("d1", draining=True)], req(), {}, "all are draining"),
    ("nobody serves the model", [inst("p1", P), inst("d1")], req(model="x"), {},
     "no prefill instance for model 'x': of 1 candidate(s), none serves model 'x'"),
    ("request too long", [inst("p1", P), inst("d1", max_model_len=100)], req(), {}, "max_model_len >= 128"),
    ("no room anywhere", [inst("p1", P), inst("d1", free=3)], req(), {}, "free KV blocks for 128 tokens"),
]


@pytest.mark.parametrize("instances, request_, depths, expected", [c[1:] for c in DECIDE_CASES],
                         ids=[c[0] for c in DECIDE_CASES])
def test_decide(instances, request_, depths, expected):
    decision = decide(snap(*instances), request_, default_policy(), FakeIndex(depths))
    if isinstance(expected, Route):
        assert decision == expected
    else:
        assert isinstance(decision, NoRoute)
        assert expected in decision.reason


def test_decide_ignores_instance_order():
    instances = [inst("d3", free=50), inst("d1", free=50), inst("p2", P), inst("p1", P), inst("d2", free=50)]
    forward = ClusterSnapshot(NOW, tuple(instances), TIMEOUT)
    backward = ClusterSnapshot(NOW, tuple(reversed(instances)), TIMEOUT)
    index = FakeIndex({})
    assert decide(forward, req(), default_policy(), index) == decide(backward, req(), default_policy(), index) \
        == Route("p1", "d1")
