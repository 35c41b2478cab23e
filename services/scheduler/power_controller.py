"""`PowerController`: the scheduler's power loop, the executor of policies/power.py (a slow loop, like
the autoscaler: seconds, not the routing path).

    every --power-interval-s:  Worker.Stats on every live instance (its GpuPower: W, clock, can it cap)
                               + its decode batch from the registry ─▶ StepCost (the profile's roofline)
                               ─▶ policies.power.decide (pure) ─▶ Worker.SetPowerCap where a cap changed

Power is read from the workers over gRPC rather than from Prometheus: the scheduler needs the readings of
the instances it knows, now, and the clock each one is locked at, and the workers serve both on Stats
(the dashboards read the same numbers from the workers' /metrics). The worker applies a cap through its
backend: the simulated GPU always (its engine's steps slow with the clock), a real GPU only where the
deployment allows it (`--power-control`); a read-only GPU answers PERMISSION_DENIED once and is then
counted but never capped. A worker that restarted (its clock cap gone) gets its cap again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from services.common.cluster import InstanceState, RequestPhase
from services.common.gpu_power import StepCost
from services.common.grpc_util import aio_channel
from services.engine.sim_profile import SimProfile
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.policies.power import (
    GpuInstance,
    PowerConfig,
    PowerDecision,
    PowerState,
    decide,
    decode_step,
)
from services.scheduler.registry import Registry

log = logging.getLogger("ferry.scheduler.power")
STATS_TIMEOUT_S = 2.0
DECODING = (RequestPhase.DECODING, RequestPhase.MIGRATING)


def instance_decode_step(profile: SimProfile, state: InstanceState) -> StepCost | None:
    """Its decode step now, from its last heartbeat."""
    decoding = [r for r in state.load.requests if r.phase in DECODING]
    return decode_step(profile, state.spec.role.can_decode, len(decoding), sum(r.num_tokens for r in decoding))


class PowerController:
    def __init__(self, registry: Registry, config: PowerConfig, profile: SimProfile, metrics: SchedulerMetrics, *,
                 interval_s: float, clock: Callable[[], float] = time.time) -> None:
        self.registry, self.config, self.profile, self.metrics = registry, config, profile, metrics
        self.interval_s, self.clock = interval_s, clock
        self.state = PowerState()
        self.decision: PowerDecision | None = None
        self.applied: dict[str, float | None] = {}       # instance id -> clock cap last applied (None: none)
        self.read_only: set[str] = set()                 # refused a cap (PERMISSION_DENIED)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def run(self, stop: asyncio.Event) -> None:
        log.info("power budget %.0f W: reading the workers every %g s (T1 %.0f%%, T2 %.0f%%, low priority: %s)",
                 self.config.budget_watts, self.interval_s, 100 * self.config.threshold1,
                 100 * self.config.threshold2, ", ".join(sorted(self.config.low_priority_pools)) or "none")
        while not stop.is_set():
            try:
                await self.step()
            except Exception:        # the loop must outlive one bad round
                log.exception("power controller round failed")
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
        for channel in self._channels.values():
            await channel.close()

    async def step(self) -> PowerDecision | None:
        now = self.clock()
        alive = self.registry.snapshot(now).alive()
        readings = await asyncio.gather(*(self._stats(s) for s in alive))
        instances, gpus = [], {}
        for state, gpu in zip(alive, readings, strict=True):
            if gpu is None:
                continue
            gpus[state.instance_id] = gpu
            instances.append(GpuInstance(state.instance_id, state.spec.role.value, gpu.power_watts,
                                         instance_decode_step(self.profile, state),
                                         gpu.can_cap and state.instance_id not in self.read_only))
        self.applied = {k: v for k, v in self.applied.items() if k in gpus}
        decision, self.state = decide(self.config, tuple(instances), self.state, now)
        self.decision = decision
        await asyncio.gather(*(self._apply(s, decision, gpus[s.instance_id]) for s in alive
                               if s.instance_id in gpus))
        self.metrics.observe_power(decision)
        if decision.changed_ids:
            log.info("power %.0f W of %.0f W (%s): %d cap(s) in force, changed %s", decision.total_watts,
                     self.config.budget_watts, decision.level.value, len(decision.caps), ", ".join(decision.changed_ids))
        return decision

    async def _stats(self, state: InstanceState) -> worker_pb2.GpuPower | None:
        try:
            reply = await self._stub(state.spec.address).Stats(worker_pb2.StatsRequest(), timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.debug("Stats on %s: %s", state.instance_id, e.code().name)
            return None
        return reply.gpu if reply.HasField("gpu") else None

    async def _apply(self, state: InstanceState, decision: PowerDecision, gpu: worker_pb2.GpuPower) -> None:
        iid = state.instance_id
        cap = next((c for c in decision.caps if c.instance_id == iid), None)
        wanted = cap.clock_mhz if cap is not None else None
        # A worker reports its clock cap; one that lost it (restarted) while a cap was applied gets it again.
        lost = self.applied.get(iid) is not None and gpu.clock_cap_mhz == 0 and gpu.backend == "simulated"
        if iid in self.read_only or (self.applied.get(iid, None) == wanted and not lost):
            return
        if wanted is None and iid not in self.applied and gpu.clock_cap_mhz == 0:
            return                                        # never capped by us: nothing to undo
        request = worker_pb2.PowerCapRequest(clock_mhz=wanted or 0.0, watts=cap.watts if cap else 0.0,
                                             reason=cap.reason if cap else "uncap")
        try:
            reply = await self._stub(state.spec.address).SetPowerCap(request, timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            self.metrics.power_cap_errors.inc()
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                self.read_only.add(iid)
                log.warning("%s does not take power caps (%s); counted, never capped", iid, e.details())
            else:
                log.info("SetPowerCap on %s: %s %s", iid, e.code().name, e.details())
            return
        self.applied[iid] = wanted
        self.metrics.power_cap_changes.labels(pool=state.spec.role.value, reason=request.reason).inc()
        log.info("%s: %s (%s)", iid, reply.applied, request.reason)

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if address not in self._channels:
            self._channels[address] = aio_channel(address)
        return worker_pb2_grpc.WorkerStub(self._channels[address])
