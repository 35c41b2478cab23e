"""Just-in-time evacuation of an instance a cloud is about to preempt (SpotServe), one round at a time.

A `PreemptionNotice` gives the instance and its deadline. Routing to it stops when the notice comes (the
scheduler marks it draining); then every migration round decides each of its requests afresh:

    finish     it completes in place before the deadline (minus a safety margin), predicted from the
               tokens it may still generate and the instance's measured seconds per token
    migrate    live-migrate it to a survivor: decoding goes on while its KV is copied, so no token is
               recomputed. The requests of a round are assigned to the survivors' free room by a
               minimum-cost matching (Kuhn–Munkres, assignment.py): each survivor offers slots, deeper
               slots cost more, and a request costs its KV size times how full the slot leaves the
               survivor, so the largest KV goes where most room stays and no survivor is overfilled
    no_room    it must leave but fits on no survivor now (the platform is asked for a replacement);
               decided again next round, when migrations or finished requests have freed room
    wait       not movable yet (still prefilling, or its KV is on the move already)

Predictions are re-checked every round, so a request that was going to finish but falls behind (its
instance slowed down) is migrated while there is still time. Without a measured rate nothing is
predicted to finish: every decoding request migrates.

    plan_evacuation(ledger, notice, now, config, seconds_per_token) -> decisions   (moves go on the ledger)

It runs first in `plan_migrations` (a deadline beats every other reason), on the same `RoundLedger`, so
later policies see the room it took.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from services.common.cluster import InstanceState, MigrationReason, Priority, RequestLoad, RequestPhase
from services.scheduler.policies.assignment import min_cost_assignment
from services.scheduler.policies.migration_ledger import RoundLedger


@dataclass(frozen=True, slots=True)
class PreemptionNotice:
    instance_id: str
    deadline: float          # clock seconds (the scheduler's: Unix time) at which the instance goes away
    source: str = "admin"    # node-taint | aws-metadata | gcp-metadata | azure-metadata | admin


@dataclass(frozen=True, slots=True)
class PreemptionConfig:
    safety_margin_s: float = 3.0          # a request finishing in place must be done this long before
    max_moves_per_round: int = 16         # the matching's size per instance and round
    slots_per_survivor: int = 8           # how many of a round's requests one survivor may take

    def __post_init__(self) -> None:
        if self.safety_margin_s < 0:
            raise ValueError(f"safety_margin_s {self.safety_margin_s}: use >= 0 seconds")
        if self.max_moves_per_round < 1 or self.slots_per_survivor < 1:
            raise ValueError("max_moves_per_round and slots_per_survivor must be >= 1")


class Action(enum.Enum):
    FINISH = "finish"
    MIGRATE = "migrate"
    NO_ROOM = "no_room"
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Evacuation:
    """One request's fate this round."""
    request_id: str
    action: Action
    destination_id: str = ""
    finish_in_s: float = math.inf         # FINISH: predicted seconds until it completes


def plan_evacuation(ledger: RoundLedger, notice: PreemptionNotice, now: float, config: PreemptionConfig,
                    seconds_per_token: float | None) -> tuple[Evacuation, ...]:
    """Decide every request of the noticed instance; the migrations are added to `ledger` (reason
    PREEMPTION). An unknown instance gives ()."""
    source = ledger.instances.get(notice.instance_id)
    if source is None:
        return ()
    ledger.evacuating.add(notice.instance_id)          # the drain policy leaves its requests to this one
    time_left = notice.deadline - now - config.safety_margin_s
    decisions: list[Evacuation] = []
    leaving: list[RequestLoad] = []
    for request in sorted(source.load.requests, key=_urgency):
        finish_in = request.max_tokens * seconds_per_token if seconds_per_token is not None else math.inf
        if finish_in <= time_left:
            decisions.append(Evacuation(request.request_id, Action.FINISH, finish_in_s=finish_in))
        elif request.phase is not RequestPhase.DECODING or request.request_id in ledger.in_flight:
            decisions.append(Evacuation(request.request_id, Action.WAIT))
        else:
            leaving.append(request)
    movable = leaving[:config.max_moves_per_round] if ledger.can_send(source) else []
    decisions += [Evacuation(r.request_id, Action.WAIT) for r in leaving[len(movable):]]
    destinations = _match(ledger, source, movable, config) if movable else {}
    for request in movable:
        destination = destinations.get(request.request_id)
        # The matching used a mean request size per slot; the ledger checks each real one.
        if destination is None or not ledger.fits(ledger.instances[destination], request):
            destination = next((d.instance_id for d in ledger.destinations(source, request)), None)
        if destination is None:
            decisions.append(Evacuation(request.request_id, Action.NO_ROOM))
            continue
        ledger.move(request, notice.instance_id, destination, MigrationReason.PREEMPTION)
        decisions.append(Evacuation(request.request_id, Action.MIGRATE, destination))
    return tuple(decisions)


def _urgency(request: RequestLoad) -> tuple:
    """HIGH priority first, then the most tokens still to generate (the least likely to finish)."""
    return request.priority is not Priority.HIGH, -request.max_tokens, request.request_id


def _match(ledger: RoundLedger, source: InstanceState, requests: list[RequestLoad],
           config: PreemptionConfig) -> dict[str, str]:
    """Request id -> survivor, by a minimum-cost assignment of the requests to survivors' slots."""
    mean_need = sum(ledger.num_blocks_needed(source, r) for r in requests) / len(requests)
    slots: list[tuple[InstanceState, int]] = []
    for survivor in ledger.instances.values():
        if not ledger.can_receive(source, survivor) or survivor.load.num_blocks <= 0:
            continue
        room = survivor.load.num_free_blocks
        depth = min(config.slots_per_survivor, len(requests), int(room // max(mean_need, 1)))
        slots += [(survivor, j) for j in range(depth)]
    if not slots:
        return {}
    cost = [[_slot_cost(ledger, survivor, j, mean_need, request) for survivor, j in slots] for request in requests]
    if len(requests) > len(slots):             # the largest requests get the slots; the rest wait a round
        order = sorted(range(len(requests)), key=lambda i: -requests[i].num_blocks)[:len(slots)]
        requests, cost = [requests[i] for i in order], [cost[i] for i in order]
    try:
        columns = min_cost_assignment(cost)
    except ValueError:                         # nothing fits anywhere: no_room for all of them
        return {}
    return {requests[i].request_id: slots[c][0].instance_id for i, c in enumerate(columns)
            if math.isfinite(cost[i][c])}


def _slot_cost(ledger: RoundLedger, survivor: InstanceState, depth: int, mean_need: float,
               request: RequestLoad) -> float:
    """The request's KV size times how full the survivor is once this slot is taken; infinite where
    the request does not fit at all."""
    if not ledger.fits(survivor, request):
        return math.inf
    used = survivor.load.num_blocks - survivor.load.num_free_blocks + (depth + 1) * mean_need
    return max(request.num_blocks, 1) * used / survivor.load.num_blocks
