"""The scheduler's slow loop: every interval, read the gateways' counters (Prometheus or the built-in
scraper, telemetry.py) and the pools' load (the registry: heartbeats), turn them into `PoolSignals`,
run the pure autoscaling policy and keep its decisions for `GetScaleRecommendations`.

    totals ──CounterWindow──▶ increases over the window ─┐
    registry ──sampled each tick──▶ pool load means ──────┼─▶ pool_signals() ─▶ policies.autoscale.decide
    profile + SLO ──capacity.py──▶ per-instance goodput ──┘

Queue lengths and KV use come from the registry, not Prometheus: the scheduler holds them first-hand
(heartbeats every 100 ms); Prometheus would only hand its own gauges back a scrape later. What only the
gateways see (SLO attainment, demand, prompt/output lengths) comes from Prometheus or the scrape.
A source that fails is logged and counted; the loop goes on with the data it has (none: no change).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.common.cluster import ClusterSnapshot, Role
from services.engine.sim_profile import SimProfile
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.policies.autoscale import (
    AutoscaleConfig,
    AutoscaleState,
    PoolSignals,
    ScaleDecision,
    decide,
)
from services.scheduler.policies.capacity import EngineShape, Workload, decode_goodput, prefill_goodput
from services.scheduler.registry import Registry
from services.scheduler.telemetry import CounterWindow, TelemetryError

log = logging.getLogger("ferry.scheduler.autoscaler")
POOL_ROLES = {"prefill": Role.PREFILL, "decode": Role.DECODE}


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """One pool at one instant, from the registry."""
    replicas: int                 # healthy, not draining
    waiting: float                # requests waiting for their first step, per instance
    running: int                  # requests running or waiting on the pool
    kv_utilization: float         # mean over the pool, 0..1
    num_blocks: float             # mean KV blocks per instance
    block_size: int


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float
    tpot_s: float


def pool_loads(snapshot: ClusterSnapshot, model: str = "") -> dict[str, PoolLoad]:
    """The pools' load; `model` set: only that model's instances (other models' pools are not sized)."""
    loads = {}
    for pool, role in POOL_ROLES.items():
        serving = [i for i in snapshot.alive() if i.spec.role is role and not i.load.draining
                   and (not model or i.spec.model == model)]
        n = len(serving)
        loads[pool] = PoolLoad(
            replicas=n,
            waiting=sum(i.load.num_waiting for i in serving) / n if n else 0.0,
            running=sum(i.load.num_running + i.load.num_waiting for i in serving),
            kv_utilization=sum(1 - i.load.free_fraction for i in serving) / n if n else 0.0,
            num_blocks=sum(i.load.num_blocks for i in serving) / n if n else 0.0,
            block_size=serving[0].spec.block_size if serving else 16)
    return loads


def pool_signals(increase: dict[str, float], span_s: float, loads: list[dict[str, PoolLoad]], profile: SimProfile,
                 slo: Slo, max_num_seqs: int) -> dict[str, PoolSignals]:
    """Signals per pool from the window's counter increases, the pool-load samples in the window (the
    last one gives the replica count) and the per-instance goodput model."""
    finished = increase.get("requests", 0.0)
    workload = None
    if finished > 0:
        workload = Workload(increase["prompt_tokens"] / finished, increase["generation_tokens"] / finished)
    signals = {}
    for pool in POOL_ROLES:
        samples = [sample[pool] for sample in loads]
        now = samples[-1]
        busy = any(s.running for s in samples)
        demand = finished / span_s if span_s > 0 and (finished > 0 or not busy) else None
        capacity = None
        if workload is not None:
            if pool == "prefill":
                capacity = prefill_goodput(profile, workload, slo.ttft_s)
            else:
                shape = EngineShape(num_blocks=int(sum(s.num_blocks for s in samples) / len(samples)),
                                    block_size=now.block_size, max_num_seqs=max_num_seqs)
                capacity = decode_goodput(profile, workload, shape, slo.tpot_s)
        met, judged = (increase.get("ttft_met", 0.0), increase.get("ttft_total", 0.0)) if pool == "prefill" else \
            (increase.get("tpot_met", 0.0), increase.get("tpot_total", 0.0))
        signals[pool] = PoolSignals(
            replicas=now.replicas, demand_rps=demand, capacity_rps=capacity or None,
            slo_attainment=met / judged if judged > 0 else None,
            waiting_per_instance=sum(s.waiting for s in samples) / len(samples),
            kv_utilization=sum(s.kv_utilization for s in samples) / len(samples))
    return signals


class Autoscaler:
    def __init__(self, registry: Registry, source, config: AutoscaleConfig, profile: SimProfile, slo: Slo, *,
                 interval_s: float, window_s: float, metrics: SchedulerMetrics, max_num_seqs: int = 256,
                 model: str = "", clock: Callable[[], float] = time.time) -> None:
        self.registry, self.source, self.config, self.profile, self.slo = registry, source, config, profile, slo
        self.interval_s, self.metrics, self.max_num_seqs, self.clock = interval_s, metrics, max_num_seqs, clock
        self.model = model
        self.counters = CounterWindow(window_s)
        self.loads: deque[tuple[float, dict[str, PoolLoad]]] = deque()
        self.state = AutoscaleState()
        self.decisions: list[ScaleDecision] = []
        self.signals: dict[str, PoolSignals] = {}
        self.decided_at = 0.0
        self._last_error = ""

    async def run(self, stop: asyncio.Event) -> None:
        log.info("autoscaling every %g s from %s", self.interval_s, self.source.describe())
        while not stop.is_set():
            await self.step()
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass

    async def step(self) -> list[ScaleDecision]:
        now = self.clock()
        try:
            self.counters.add(now, await self.source.read())
            self._last_error = ""
        except TelemetryError as e:
            self.metrics.telemetry_errors.inc()
            if str(e) != self._last_error:              # once per distinct failure, not every tick
                log.warning("autoscaler: %s", e)
                self._last_error = str(e)
        self.loads.append((now, pool_loads(self.registry.snapshot(now), self.model)))
        while self.loads[0][0] < now - self.counters.window_s:
            self.loads.popleft()
        self.signals = pool_signals(self.counters.increase(), self.counters.span_s(now),
                                    [load for _, load in self.loads], self.profile, self.slo, self.max_num_seqs)
        previous = {d.pool: d.desired for d in self.decisions}
        self.decisions, self.state = decide(self.config, self.signals, self.state, now)
        self.decided_at = now
        for d in self.decisions:
            self.metrics.observe_scale_decision(d, self.signals[d.pool], previous.get(d.pool, d.current))
        return self.decisions
