"""Migration policies: which running requests to live-migrate where, one round at a time (Llumnix).

`plan_migrations` runs these in order of precedence, each seeing what the earlier ones decided
(migration_ledger.py keeps the projection, so a round never overfills a destination):

    drain          every movable request off each draining instance
    priority       off an instance whose HIGH requests' remaining growth exceeds its free blocks,
                   until it no longer does
    defragment     off an instance whose first waiting request needs more blocks than are free,
                   only when the planned moves let it in (all or nothing: half a hole is no use)
    load balance   from the least free instance to the freest while their freeness gap passes
                   `load_balance_gap`, and only when the move does not open the same gap the
                   other way (that would bounce the request back next round)

Victims are DECODING requests not in `in_flight` (WAITING/PREFILLING have no KV to move yet;
MIGRATING/ARRIVING are moving already). The optional policies never take HIGH requests nor ones
under `min_victim_blocks`, and take LOW before NORMAL, last come first. Draining takes everything,
HIGH first, so scarce room goes to the requests with the tightest SLO.

Limits: `max_migrations_per_round` and `max_migrations_per_instance` (counted at either end) bound
the optional policies. Drain is bounded only by destination capacity (scale-down and spot
preemption have a deadline), but its moves count toward the limits the others see.
Ties go to the smallest instance id, then request id: the same input gives the same output.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from services.common.cluster import (
    ClusterSnapshot,
    InstanceState,
    Migration,
    MigrationReason,
    Priority,
    RequestLoad,
    RequestPhase,
)
from services.scheduler.policies.freeness import freeness, high_priority_headroom
from services.scheduler.policies.migration_ledger import RoundLedger, drain_order, victim_order


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    """Which policies run and how far one round may go; each bool turns one policy on or off."""
    drain: bool = True
    priority: bool = True
    defragmentation: bool = True
    load_balance: bool = True
    load_balance_gap: float = 16.0        # freeness gap (blocks per running request) that triggers a move
    max_migrations_per_round: int = 8
    max_migrations_per_instance: int = 2  # as source or destination, per round
    min_victim_blocks: int = 1            # smaller requests are not worth a migration (except draining)
    growth_margin_tokens: int = 128       # a destination keeps room for this much of a victim's growth

    def __post_init__(self) -> None:
        if not (math.isfinite(self.load_balance_gap) and self.load_balance_gap > 0):
            raise ValueError(f"load_balance_gap is {self.load_balance_gap}; set a finite number > 0 "
                             "(a gap of 0 would move requests back and forth)")
        for name in ("max_migrations_per_round", "max_migrations_per_instance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; set it to >= 1, or turn the "
                                 "policies off (drain/priority/defragmentation/load_balance=False)")
        for name in ("min_victim_blocks", "growth_margin_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is {getattr(self, name)}; set it to >= 0")


def plan_migrations(snapshot: ClusterSnapshot, config: MigrationConfig, in_flight: frozenset[str] = frozenset(),
                    ledger: RoundLedger | None = None) -> tuple[Migration, ...]:
    """One round of migration decisions (see the module docstring for the order and the rules). A
    `ledger` the preemption planner started (preemption.py) carries its moves in; the instances it
    evacuates are not drained again."""
    ledger = ledger or RoundLedger(snapshot, in_flight, config.growth_margin_tokens)
    if config.drain:
        for instance_id in [i for i, instance in ledger.instances.items()
                            if instance.load.draining and i not in ledger.evacuating]:
            _drain_instance(ledger, instance_id)
    if config.priority:
        _restore_priority_headroom(ledger, config)
    if config.defragmentation:
        _defragment(ledger, config)
    if config.load_balance:
        _balance_load(ledger, config)
    return tuple(ledger.migrations)


def drain(snapshot: ClusterSnapshot, instance_id: str, config: MigrationConfig,
          in_flight: frozenset[str] = frozenset()) -> tuple[Migration, ...]:
    """Move every movable request off `instance_id` (draining flag set or not) to the freest eligible
    destinations, as far as their capacity goes. Requests that fit nowhere, or are not DECODING yet,
    stay: call again next round. An unknown or dead instance gives ()."""
    ledger = RoundLedger(snapshot, in_flight, config.growth_margin_tokens)
    _drain_instance(ledger, instance_id)
    return tuple(ledger.migrations)


def _drain_instance(ledger: RoundLedger, source_id: str) -> None:
    source = ledger.instances.get(source_id)
    if source is None or not ledger.can_send(source):
        return
    for victim in ledger.victims(source, drain_order):
        destination = next(iter(ledger.destinations(source, victim)), None)
        if destination is not None:
            ledger.move(victim, source_id, destination.instance_id, MigrationReason.DRAIN)


def _headroom_shortfall(instance: InstanceState) -> int:
    """Blocks the instance's HIGH requests may still grow by, beyond its free blocks."""
    return high_priority_headroom(instance) - instance.load.num_free_blocks


def _admission_shortfall(instance: InstanceState) -> int:
    """Blocks the first waiting request still needs, beyond the free blocks (the engine admits in
    arrival order, so a later, smaller one does not count)."""
    waiting = [r for r in instance.load.requests if r.phase is RequestPhase.WAITING]
    if not waiting:
        return 0
    first = min(waiting, key=lambda r: (r.arrival, r.request_id))
    num_needed = max(0, instance.spec.num_blocks_for(first.num_tokens) - first.num_blocks)
    return num_needed - instance.load.num_free_blocks


def _restore_priority_headroom(ledger: RoundLedger, config: MigrationConfig) -> None:
    """Worst shortfall first; partial progress counts (every block freed is headroom back)."""
    short = [i for i in _optional_sources(ledger) if _headroom_shortfall(i) > 0]
    for source in sorted(short, key=lambda i: (-_headroom_shortfall(i), i.instance_id)):
        _move_until_covered(ledger, config, source.instance_id, MigrationReason.PRIORITY,
                            _headroom_shortfall)


def _defragment(ledger: RoundLedger, config: MigrationConfig) -> None:
    """All or nothing per instance: moves that do not let the waiting request in are dropped."""
    for source in [i for i in _optional_sources(ledger) if _admission_shortfall(i) > 0]:
        tentative = ledger.fork()
        if _move_until_covered(tentative, config, source.instance_id, MigrationReason.DEFRAGMENTATION,
                               _admission_shortfall):
            ledger.adopt(tentative)


def _balance_load(ledger: RoundLedger, config: MigrationConfig) -> None:
    """One move at a time, recomputing freeness after each, until no pair passes the gap."""
    while _try_balance_one(ledger, config):
        pass


def _try_balance_one(ledger: RoundLedger, config: MigrationConfig) -> bool:
    gap = config.load_balance_gap
    for source in sorted(_optional_sources(ledger), key=lambda i: (freeness(i), i.instance_id)):
        for victim in _optional_victims(ledger, config, source):
            for destination in ledger.destinations(source, victim):
                if freeness(destination) - freeness(source) < gap:
                    break   # destinations come freest first: no later one passes the gap either
                if not _within_limits(ledger, config, source, destination):
                    continue
                trial = ledger.fork()
                trial.move(victim, source.instance_id, destination.instance_id, MigrationReason.LOAD_BALANCE)
                after_source, after_destination = (trial.instances[source.instance_id],
                                                   trial.instances[destination.instance_id])
                if freeness(after_source) - freeness(after_destination) < gap:   # no inverted gap
                    ledger.adopt(trial)
                    return True
    return False


def _move_until_covered(ledger: RoundLedger, config: MigrationConfig, source_id: str,
                        reason: MigrationReason, shortfall: Callable[[InstanceState], int]) -> bool:
    """Move optional victims off the source, each to the freest destination within limits, until its
    `shortfall` (in blocks) is covered; whether it got there. An instance that received requests
    this round sends none."""
    if not ledger.can_send(ledger.instances[source_id]):
        return False
    for victim in _optional_victims(ledger, config, ledger.instances[source_id]):
        source = ledger.instances[source_id]
        if shortfall(source) <= 0:
            break
        destination = next((d for d in ledger.destinations(source, victim)
                            if _within_limits(ledger, config, source, d)), None)
        if destination is not None:
            ledger.move(victim, source_id, destination.instance_id, reason)
    return shortfall(ledger.instances[source_id]) <= 0


def _optional_sources(ledger: RoundLedger) -> list[InstanceState]:
    return [i for i in ledger.instances.values() if not i.load.draining and ledger.can_send(i)]


def _optional_victims(ledger: RoundLedger, config: MigrationConfig, source: InstanceState) -> list[RequestLoad]:
    return [r for r in ledger.victims(source, victim_order)
            if r.priority is not Priority.HIGH and r.num_blocks >= config.min_victim_blocks]


def _within_limits(ledger: RoundLedger, config: MigrationConfig, source: InstanceState,
                   destination: InstanceState) -> bool:
    return (len(ledger.migrations) < config.max_migrations_per_round
            and ledger.num_migrations(source.instance_id) < config.max_migrations_per_instance
            and ledger.num_migrations(destination.instance_id) < config.max_migrations_per_instance)
