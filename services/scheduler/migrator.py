"""`Migrator`: carries out the migration policies — the fast loop's second half (routing is the first).

    every interval:  snapshot ─▶ evacuations of preempted instances (evacuator.py), then
                     plan_migrations (pure), on one ledger ─▶ Worker.Migrate on each source, concurrently
                     drain(instance): mark it draining here and on the worker; the next rounds move
                     its requests away (the drain policy comes first in every round)
                     preempt(notice): the evacuator takes the notice, then drain (its requests are
                     then planned just in time, not drained)

A request is in flight from the decision until the source answers, and then cools down for
`cooldown_s` (its new place reports it as a fresh arrival, and last-come-first must not bounce it
straight back). Outcomes, downtime and bytes become metrics; a failed migration leaves the request
where it was (the worker guarantees it), so the next round simply decides again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from services.common.cluster import Migration
from services.common.grpc_util import aio_channel
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
from services.scheduler.evacuator import Evacuator
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.policies.migration import MigrationConfig, plan_migrations
from services.scheduler.policies.migration_ledger import RoundLedger
from services.scheduler.policies.preemption import PreemptionConfig, PreemptionNotice
from services.scheduler.registry import Registry

log = logging.getLogger("ferry.scheduler.migrator")
MIGRATE_TIMEOUT_S = 300.0


class Migrator:
    def __init__(self, registry: Registry, config: MigrationConfig, metrics: SchedulerMetrics, *,
                 interval_s: float, cooldown_s: float = 5.0, clock: Callable[[], float] = time.time,
                 evacuator: Evacuator | None = None) -> None:
        self.registry = registry
        self.evacuator = evacuator or Evacuator(PreemptionConfig(), metrics, clock=clock)
        self.config = config
        self.metrics = metrics
        self.interval_s = interval_s
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.in_flight: dict[str, asyncio.Task] = {}
        self._cooling: dict[str, float] = {}            # request id -> until (clock seconds)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def plan(self) -> tuple[Migration, ...]:
        now = self.clock()
        self._cooling = {rid: until for rid, until in self._cooling.items() if until > now}
        busy = frozenset(self.in_flight) | frozenset(self._cooling)
        snapshot = self.registry.snapshot(now)
        ledger = RoundLedger(snapshot, busy, self.config.growth_margin_tokens)
        self.evacuator.plan(ledger, now)                # a deadline comes first
        return plan_migrations(snapshot, self.config, busy, ledger=ledger)

    def start_round(self) -> list[asyncio.Task]:
        tasks = []
        for decision in self.plan():
            task = asyncio.create_task(self._execute(decision))
            self.in_flight[decision.request_id] = task
            tasks.append(task)
        return tasks

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.start_round()
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
        for task in self.in_flight.values():
            task.cancel()
        await asyncio.gather(*self.in_flight.values(), return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    async def drain(self, instance_id: str, cancel: bool = False) -> int:
        """Stop routing to an instance and move its requests away (or, with `cancel`, route to it
        again); returns how many requests it holds now. KeyError when the instance is unknown; the
        worker's own Drain is best effort (an instance that cannot be reached is marked here all the same)."""
        state = self.registry.get(instance_id)
        if state is None:
            raise KeyError(instance_id)
        self.registry.mark_draining(instance_id, not cancel)
        try:
            await self._stub(state.spec.address).Drain(worker_pb2.DrainRequest(cancel=cancel), timeout=5)
        except grpc.aio.AioRpcError as e:
            log.warning("Drain(cancel=%s) on %s failed (%s); marked for routing only", cancel, instance_id,
                        e.code().name)
        log.info("%s %s (%d requests)", "undraining" if cancel else "draining", instance_id,
                 len(state.load.requests))
        return len(state.load.requests)

    async def preempt(self, notice: PreemptionNotice) -> int:
        """`drain` for a preemption: the evacuator has the notice before the instance is marked draining
        (with no await between), or a round in between would move all its requests at once as a plain
        drain instead of just in time. KeyError when the instance is unknown (no notice is kept)."""
        if self.registry.get(notice.instance_id) is None:
            raise KeyError(notice.instance_id)
        self.evacuator.notify(notice)
        return await self.drain(notice.instance_id)

    async def _execute(self, m: Migration) -> None:
        source, destination = self.registry.get(m.source_id), self.registry.get(m.destination_id)
        reason, outcome = m.reason.value, "cancelled"
        try:
            if source is None or destination is None:
                outcome = "gone"
                return
            reply = await self._stub(source.spec.address).Migrate(worker_pb2.MigrateRequest(
                request_id=m.request_id, destination_address=destination.spec.address), timeout=MIGRATE_TIMEOUT_S)
            outcome = "migrated" if reply.migrated else "failed"
            if reply.migrated:
                self.metrics.migration_downtime.observe(reply.downtime_s)
                self.metrics.migration_duration.observe(reply.duration_s)
                self.metrics.migration_bytes.labels(reason=reason).inc(reply.num_bytes)
                log.info("%s: %s %s -> %s, %.1f ms down", reason, m.request_id, m.source_id, m.destination_id,
                         reply.downtime_s * 1e3)
            else:
                log.info("%s: %s %s -> %s not migrated: %s", reason, m.request_id, m.source_id,
                         m.destination_id, reply.reason)
        except grpc.aio.AioRpcError as e:
            outcome = "not_found" if e.code() == grpc.StatusCode.NOT_FOUND else "error"
            log.info("%s: Migrate %s on %s: %s %s", reason, m.request_id, m.source_id, e.code().name, e.details())
        finally:
            self.in_flight.pop(m.request_id, None)
            self._cooling[m.request_id] = self.clock() + self.cooldown_s
            self.metrics.migrations.labels(reason=reason, outcome=outcome).inc()

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if address not in self._channels:
            self._channels[address] = aio_channel(address)
        return worker_pb2_grpc.WorkerStub(self._channels[address])
