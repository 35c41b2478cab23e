"""The instance registry: who is registered, their last reported load and when they last spoke.

A plain data structure: every method that depends on time takes `now` (seconds, the caller's
clock), so the server feeds it the wall clock and tests feed it numbers. `snapshot(now)` freezes it
into the `ClusterSnapshot` the policies read.
"""
from __future__ import annotations

import dataclasses

from services.common.cluster import ClusterSnapshot, InstanceSpec, InstanceState, WorkerLoad


class Registry:
    def __init__(self, heartbeat_timeout_s: float) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._states: dict[str, InstanceState] = {}
        # Drain state the scheduler set (DrainInstance and its cancel): it wins over heartbeats, which may
        # have left the worker before the worker got the Drain (or its cancel).
        self._drain_set: dict[str, bool] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._states

    def get(self, instance_id: str) -> InstanceState | None:
        return self._states.get(instance_id)

    def states(self) -> tuple[InstanceState, ...]:
        return tuple(self._states[k] for k in sorted(self._states))

    def register(self, spec: InstanceSpec, now: float, load: WorkerLoad | None = None) -> bool:
        """Add or replace an instance (a worker that restarts registers again); counts as a heartbeat.
        Returns True when the id was new. A re-registration keeps the last load unless one is given."""
        old = self._states.get(spec.instance_id)
        if load is None:
            load = old.load if old is not None and old.spec == spec else WorkerLoad()
        self._states[spec.instance_id] = InstanceState(spec, load, now)
        self._drain_set.pop(spec.instance_id, None)     # a new process: its own load says if it drains
        return old is None

    def restore(self, state: InstanceState) -> None:
        """Put back an instance exactly as persisted (its heartbeat time included)."""
        self._states[state.instance_id] = state

    def heartbeat(self, instance_id: str, load: WorkerLoad, now: float) -> bool:
        """Record a heartbeat; False when the id is unknown (the worker must register again)."""
        old = self._states.get(instance_id)
        if old is None:
            return False
        wanted = self._drain_set.get(instance_id)
        if wanted is not None and load.draining != wanted:
            load = dataclasses.replace(load, draining=wanted)
        self._states[instance_id] = InstanceState(old.spec, load, max(now, old.last_heartbeat))
        return True

    def deregister(self, instance_id: str) -> bool:
        """Remove an instance; False when it was not registered (deregistering twice is harmless)."""
        self._drain_set.pop(instance_id, None)
        return self._states.pop(instance_id, None) is not None

    def reserve(self, instance_id: str, num_blocks: int) -> None:
        """Count a routed request against an instance's load until its next heartbeat replaces it.

        Heartbeats come every few hundred ms; without this a burst of requests between two
        heartbeats would all see the same "least loaded" instance and pile onto it.
        """
        old = self._states.get(instance_id)
        if old is None:
            return
        load = dataclasses.replace(old.load, num_waiting=old.load.num_waiting + 1,
                                   num_free_blocks=max(0, old.load.num_free_blocks - num_blocks))
        self._states[instance_id] = dataclasses.replace(old, load=load)

    def mark_draining(self, instance_id: str, draining: bool = True) -> None:
        """Take an instance out of routing now, or put it back (its own heartbeats say so too once it
        got the Drain). A heartbeat sent before the worker got the Drain (or its cancel) does not undo it."""
        self._drain_set[instance_id] = draining
        old = self._states.get(instance_id)
        if old is not None:
            self._states[instance_id] = dataclasses.replace(old, load=dataclasses.replace(old.load, draining=draining))

    def silent_ids(self, now: float, after_s: float) -> list[str]:
        """Ids of instances not heard from for more than `after_s` seconds, in id order."""
        return sorted(k for k, s in self._states.items() if now - s.last_heartbeat > after_s)

    def snapshot(self, now: float) -> ClusterSnapshot:
        return ClusterSnapshot(now=now, instances=self.states(), heartbeat_timeout_s=self.heartbeat_timeout_s)
