"""One migration round's ledger: the cluster as it will be once the round's decisions complete.

The migration policies plan against this projection, not against the raw snapshot, so that within
one round

- a destination is never promised more than it has: each move takes the victim's blocks plus its
  growth margin from the destination's free blocks;
- a request is never moved twice: a moved request leaves its source's list and shows up on the
  destination as ARRIVING, which is not a victim phase;
- later decisions see earlier ones: a source's freeness rises as its victims leave, a
  destination's falls as they arrive (freeness.py reads the projected instances unchanged).

      source                                         destination
      free    += victim.num_blocks   ──victim──▶     free    −= victim.num_blocks + growth margin
      running −= 1                                   running += 1

An instance is a source or a destination within one round, never both: the blocks a source frees
are free only once its migrations complete, so no destination may count on them yet.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from services.common.cluster import (
    ClusterSnapshot,
    InstanceState,
    Migration,
    MigrationReason,
    Priority,
    RequestLoad,
    RequestPhase,
)
from services.scheduler.policies.freeness import freeness, high_priority_headroom, queued_blocks

_PRIORITY_RANK = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2}


def victim_order(request: RequestLoad) -> tuple:
    """Who is disturbed first: LOW before NORMAL (before HIGH), then last come first."""
    return _PRIORITY_RANK[request.priority], -request.arrival, request.request_id


def drain_order(request: RequestLoad) -> tuple:
    """Who gets scarce room first when everything must leave: HIGH first, then last come first."""
    return -_PRIORITY_RANK[request.priority], -request.arrival, request.request_id


class RoundLedger:
    """The projected instances and the decisions taken so far in one round. Mutable, but private to
    one call of a policy entry point; the snapshot it starts from is never changed."""

    def __init__(self, snapshot: ClusterSnapshot, in_flight: frozenset[str], growth_margin_tokens: int):
        self.snapshot = snapshot
        self.in_flight = in_flight
        self.growth_margin_tokens = growth_margin_tokens
        self.instances = {i.instance_id: i for i in sorted(snapshot.instances, key=lambda i: i.instance_id)}
        self.migrations: list[Migration] = []
        self.evacuating: set[str] = set()       # preempted instances the preemption planner decides for

    def fork(self) -> RoundLedger:
        """A copy to plan on tentatively; adopt it with `adopt` or drop it."""
        other = RoundLedger(self.snapshot, self.in_flight, self.growth_margin_tokens)
        other.instances, other.migrations = dict(self.instances), list(self.migrations)
        other.evacuating = set(self.evacuating)
        return other

    def adopt(self, other: RoundLedger) -> None:
        self.instances, self.migrations, self.evacuating = other.instances, other.migrations, other.evacuating

    def num_migrations(self, instance_id: str) -> int:
        """Decisions of this round with the instance at either end."""
        return sum(instance_id in (m.source_id, m.destination_id) for m in self.migrations)

    def can_send(self, instance: InstanceState) -> bool:
        return (self.snapshot.is_alive(instance) and instance.spec.role.can_decode
                and not any(m.destination_id == instance.instance_id for m in self.migrations))

    def can_receive(self, source: InstanceState, destination: InstanceState) -> bool:
        s, d = source.spec, destination.spec
        return (d.instance_id != s.instance_id and self.snapshot.is_alive(destination)
                and d.role.can_decode and not destination.load.draining
                and (d.model, d.block_size) == (s.model, s.block_size)
                and not any(m.source_id == d.instance_id for m in self.migrations))

    def victims(self, instance: InstanceState, order: Callable[[RequestLoad], tuple]) -> list[RequestLoad]:
        """The instance's movable requests in `order`: decoding, and not already being migrated."""
        return sorted((r for r in instance.load.requests
                       if r.phase is RequestPhase.DECODING and r.request_id not in self.in_flight), key=order)

    def num_blocks_needed(self, destination: InstanceState, victim: RequestLoad) -> int:
        """The victim's blocks plus room for its next tokens (at most growth_margin_tokens of them)."""
        growth = destination.spec.num_blocks_for(min(victim.max_tokens, self.growth_margin_tokens))
        return victim.num_blocks + growth

    def fits(self, destination: InstanceState, victim: RequestLoad) -> bool:
        """Room after the destination's queued demand and, for a victim that is not HIGH, after its
        high-priority headroom (a HIGH victim may use that headroom, as routing lets it)."""
        headroom = 0 if victim.priority is Priority.HIGH else high_priority_headroom(destination)
        room = destination.load.num_free_blocks - queued_blocks(destination) - headroom
        return self.num_blocks_needed(destination, victim) <= room

    def destinations(self, source: InstanceState, victim: RequestLoad) -> Iterable[InstanceState]:
        """Eligible destinations with room for the victim, freest first (ties: smallest id)."""
        fitting = (d for d in self.instances.values() if self.can_receive(source, d) and self.fits(d, victim))
        return sorted(fitting, key=lambda d: (-freeness(d), d.instance_id))

    def move(self, victim: RequestLoad, source_id: str, destination_id: str, reason: MigrationReason) -> None:
        source, destination = self.instances[source_id], self.instances[destination_id]
        num_reserved = self.num_blocks_needed(destination, victim)
        self.instances[source_id] = _with_load(
            source, requests=tuple(r for r in source.load.requests if r.request_id != victim.request_id),
            num_running=max(0, source.load.num_running - 1),
            num_free_blocks=source.load.num_free_blocks + victim.num_blocks)
        self.instances[destination_id] = _with_load(
            destination, requests=destination.load.requests + (
                dataclasses.replace(victim, phase=RequestPhase.ARRIVING),),
            num_running=destination.load.num_running + 1,
            num_free_blocks=destination.load.num_free_blocks - num_reserved)
        self.migrations.append(Migration(victim.request_id, source_id, destination_id, reason))


def _with_load(instance: InstanceState, **changes) -> InstanceState:
    return dataclasses.replace(instance, load=dataclasses.replace(instance.load, **changes))
