"""The just-in-time preemption planner: finish in place, migrate by matching, no room, wait; and how it
shares a round with the other migration policies."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.cluster import MigrationReason, Priority, RequestPhase
from services.scheduler.policies.migration import MigrationConfig, plan_migrations
from services.scheduler.policies.migration_ledger import RoundLedger
from services.scheduler.policies.preemption import (
    Action,
    PreemptionConfig,
    PreemptionNotice,
    plan_evacuation,
)
from tests.scheduler.test_migration_policy import NOW, inst, req, snap

CONFIG = PreemptionConfig(safety_margin_s=3.0)
NOTICE = PreemptionNotice("spot", deadline=NOW + 30)


def evacuate(snapshot, notice=NOTICE, seconds_per_token=0.05, config=CONFIG, in_flight=frozenset()):
    ledger = RoundLedger(snapshot, in_flight, growth_margin_tokens=0)
    decisions = plan_evacuation(ledger, notice, NOW, config, seconds_per_token)
    return {d.request_id: d for d in decisions}, ledger


def test_a_request_that_completes_before_the_deadline_finishes_in_place():
    # 27 s left after the margin: 500 tokens at 50 ms = 25 s fits, 600 = 30 s does not.
    decisions, ledger = evacuate(snap(inst("spot", req("short", max_tokens=500), req("long", max_tokens=600),
                                           draining=True), inst("survivor")))
    assert decisions["short"].action is Action.FINISH and decisions["short"].finish_in_s == pytest.approx(25)
    assert decisions["long"].action is Action.MIGRATE and decisions["long"].destination_id == "survivor"
    assert [(m.request_id, m.reason) for m in ledger.migrations] == [("long", MigrationReason.PREEMPTION)]


def test_without_a_measured_rate_every_decoding_request_leaves():
    decisions, _ = evacuate(snap(inst("spot", req("a", max_tokens=1), draining=True), inst("survivor")),
                            seconds_per_token=None)
    assert decisions["a"].action is Action.MIGRATE


def test_prefilling_and_in_flight_requests_wait_for_the_next_round():
    decisions, ledger = evacuate(snap(inst("spot", req("pre", phase=RequestPhase.PREFILLING, max_tokens=900),
                                           req("moving", max_tokens=900), draining=True), inst("survivor")),
                                 in_flight=frozenset({"moving"}))
    assert decisions["pre"].action is decisions["moving"].action is Action.WAIT
    assert ledger.migrations == []


def test_the_largest_kv_goes_where_most_room_stays_and_the_rest_where_it_still_fits():
    spot = inst("spot", req("big", blocks=40, max_tokens=900), req("small", blocks=4, max_tokens=900), draining=True)
    decisions, _ = evacuate(snap(spot, inst("roomy", free=150), inst("tight", free=60)))
    assert decisions["big"].destination_id == "roomy"
    assert decisions["small"].action is Action.MIGRATE
    # room for the big one only on "roomy": the small one must not be put there too
    decisions, _ = evacuate(snap(spot, inst("roomy", free=42), inst("tight", free=20)))
    assert decisions["big"].destination_id == "roomy" and decisions["small"].destination_id == "tight"


def test_no_survivor_with_room_means_no_room_and_nothing_moves():
    decisions, ledger = evacuate(snap(inst("spot", req("a", blocks=50, max_tokens=900), draining=True),
                                      inst("full", free=10), inst("draining", free=190, draining=True)))
    assert decisions["a"].action is Action.NO_ROOM and ledger.migrations == []


def test_high_priority_is_matched_first_when_room_is_short():
    spot = inst("spot", req("normal", blocks=30, max_tokens=900),
                req("high", blocks=30, max_tokens=100, priority=Priority.HIGH), draining=True)
    decisions, _ = evacuate(snap(spot, inst("survivor", free=40)), seconds_per_token=1.0)
    assert decisions["high"].action is Action.MIGRATE
    assert decisions["normal"].action is Action.NO_ROOM


def test_a_round_moves_at_most_its_limit_and_the_rest_wait():
    spot = inst("spot", *[req(f"r{i}", blocks=1, max_tokens=900) for i in range(5)], draining=True)
    decisions, ledger = evacuate(snap(spot, inst("survivor")), config=PreemptionConfig(max_moves_per_round=3))
    assert len(ledger.migrations) == 3
    assert sorted(d.action.value for d in decisions.values()) == ["migrate"] * 3 + ["wait"] * 2


def test_the_drain_policy_leaves_an_evacuated_instance_to_the_planner_and_sees_its_moves():
    # "stay" finishes in place: the drain policy must not move it; and "other" (draining, not preempted)
    # may only take the room the evacuation left on the survivor.
    spot = inst("spot", req("stay", max_tokens=10), req("go", blocks=50, max_tokens=900), draining=True)
    other = inst("other", req("o", blocks=50, max_tokens=0), draining=True)
    snapshot = snap(spot, other, inst("survivor", free=60))
    ledger = RoundLedger(snapshot, frozenset(), growth_margin_tokens=0)
    plan_evacuation(ledger, NOTICE, NOW, CONFIG, 0.05)
    moves = plan_migrations(snapshot, MigrationConfig(), ledger=ledger)
    assert [(m.request_id, m.reason) for m in moves] == [("go", MigrationReason.PREEMPTION)]


def test_an_unknown_instance_gives_no_decision():
    assert evacuate(snap(inst("survivor")))[0] == {}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 2000)), min_size=1, max_size=12),
       st.lists(st.integers(0, 120), min_size=0, max_size=4), st.sampled_from([None, 0.01, 0.05]))
def test_every_request_gets_one_decision_and_no_survivor_is_overfilled(requests, frees, rate):
    spot = inst("spot", *[req(f"r{i}", blocks=b, max_tokens=t) for i, (b, t) in enumerate(requests)], draining=True)
    survivors = [inst(f"s{i}", free=f) for i, f in enumerate(frees)]
    decisions, ledger = evacuate(snap(spot, *survivors), seconds_per_token=rate)
    assert set(decisions) == {f"r{i}" for i in range(len(requests))}
    for survivor in survivors:
        assert ledger.instances[survivor.instance_id].load.num_free_blocks >= 0
    for d in decisions.values():
        if d.action is Action.FINISH:
            assert d.finish_in_s <= NOTICE.deadline - NOW - CONFIG.safety_margin_s
    assert {m.request_id for m in ledger.migrations} == {r for r, d in decisions.items() if d.action is Action.MIGRATE}
