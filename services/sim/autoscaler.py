"""Autoscaling in the simulator: the live policy (`policies.autoscale.decide`) on the simulator's own
signals, its decisions applied to the simulated pools.

Every `autoscale.interval_s` of simulated time, per pool, over the last `autoscale.window_s`:

    demand_rps       arrivals per second (every request passes through both pools)
    capacity_rps     per-instance goodput within the pool's SLO (`policies.capacity`), from the spec's
                     profile, engine limits and SLO, for the window's mean prompt and output lengths
    slo_attainment   prefill: the share of first tokens in the window with TTFT <= the SLO;
                     decode: the share of completions in the window with TPOT <= the SLO
    waiting          prefill: requests queued for prompt work; decode: KV waiting for a slot; per
                     instance that serves now
    kv_utilization   decode: mean share of KV blocks in use over the instances that serve now
    replicas         instances paid for and not draining (a starting one counts: it is committed)
    starting         of those, the ones not serving yet (the policy's feedback waits for them)

The decisions then apply: a scale-up first takes back instances this autoscaler is draining (they
still serve) and adds the rest, serving `startup_s` later (GPU time counts from the decision). A
scale-down drains the least-loaded instances (starting ones first): routing skips them, the
migration policy moves their requests away when migration is on, and otherwise they finish what they
hold. A drained instance is removed once nothing refers to it, so scale-in loses no request.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from services.scheduler.policies.autoscale import AutoscaleState, PoolSignals, ScaleDecision, decide
from services.scheduler.policies.capacity import EngineShape, Workload, decode_goodput, prefill_goodput

if TYPE_CHECKING:
    from services.sim.simulator import Simulator


class Autoscaler:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.settings = sim.spec.autoscale
        self.state = AutoscaleState()
        self.next_decision_s = self.settings.interval_s      # the first window needs data
        self.retiring: set[int] = set()                       # instances this autoscaler drains
        self.counts: Counter = Counter()
        engine = sim.spec.engine
        self.engine_shape = EngineShape(engine.num_blocks, engine.block_size, engine.max_num_seqs)

    def tick(self, now: float) -> bool:
        """Decide when an interval is due, then remove drained instances that are empty. True when one
        was removed (the routing table must forget it)."""
        if now >= self.next_decision_s:
            self.next_decision_s = now + self.settings.interval_s
            signals = {pool.name: self.signals(k, now) for k, pool in enumerate(self.sim.spec.pools)}
            decisions, self.state = decide(self.settings.policy, signals, self.state, now)
            for decision in decisions:
                self.apply(decision, now)
        return self.remove_empty()

    # -- signals -----------------------------------------------------------------------------------
    def signals(self, pool_index: int, now: float) -> PoolSignals:
        sim, spec = self.sim, self.sim.spec
        start = max(0.0, now - self.settings.window_s)
        first, last = np.searchsorted(sim.trace.arrival_s, [start, now], side="left")
        demand = (last - first) / (now - start)
        workload = (Workload(float(sim.prompt[first:last].mean()), float(sim.output[first:last].mean()))
                    if last > first else None)
        mine = sim.alive & (sim.pool_index == pool_index)
        paid = mine & ~sim.draining
        serving = paid & (sim.up_at <= now)
        num_serving = int(serving.sum())
        arrival = sim.trace.arrival_s
        if spec.pools[pool_index].name == "prefill":
            capacity = prefill_goodput(sim.profile, workload, spec.slo_ttft_s) if workload else None
            in_window = (sim.t_first > start) & (sim.t_first <= now)
            met = sim.t_first[in_window] - arrival[in_window] <= spec.slo_ttft_s
            waiting = np.bincount(sim.prefill.inst, minlength=len(mine))[serving].sum()
            kv = None
        else:
            capacity = (decode_goodput(sim.profile, workload, self.engine_shape, spec.slo_tpot_s)
                        if workload else None)
            in_window = (sim.t_done > start) & (sim.t_done <= now) & (sim.output > 1)
            tpot = (sim.t_done[in_window] - sim.t_first[in_window]) / (sim.output[in_window] - 1)
            met = tpot <= spec.slo_tpot_s
            waiting = np.bincount(sim.inbox.inst, minlength=len(mine))[serving].sum()
            used = sim.used_blocks()[serving] / spec.engine.num_blocks
            kv = float(used.mean()) if num_serving else None
        return PoolSignals(
            replicas=int(paid.sum()), starting=int(paid.sum()) - num_serving, demand_rps=demand, capacity_rps=capacity,
            slo_attainment=float(met.mean()) if len(met) else None,
            waiting_per_instance=float(waiting) / num_serving if num_serving else None, kv_utilization=kv)

    # -- decisions ---------------------------------------------------------------------------------
    def apply(self, decision: ScaleDecision, now: float) -> None:
        change = decision.desired - decision.current
        if change == 0:
            return
        self.counts["decisions"] += 1
        pool_index = next(k for k, p in enumerate(self.sim.spec.pools) if p.name == decision.pool)
        if change > 0:
            self.scale_up(pool_index, change, now)
        else:
            self.scale_down(pool_index, -change, now)

    def scale_up(self, pool_index: int, n: int, now: float) -> None:
        sim = self.sim
        reclaimable = sorted(i for i in self.retiring if sim.pool_index[i] == pool_index and sim.down_at[i] == math.inf)
        for i in reclaimable[:n]:
            sim.draining[i] = False
            self.retiring.discard(i)
            self.counts["instances_reclaimed"] += 1
            n -= 1
        sim.add_instances(sim.spec.pools[pool_index], n, serving_at=now + self.settings.startup_s)
        self.counts["instances_added"] += n

    def scale_down(self, pool_index: int, n: int, now: float) -> None:
        """Drain the `n` least-loaded instances: those still starting first, then by requests held."""
        sim = self.sim
        candidates = np.flatnonzero(sim.alive & ~sim.draining & (sim.pool_index == pool_index))
        held = self.requests_held()[candidates]
        starting = sim.up_at[candidates] > now
        chosen = candidates[np.lexsort((-candidates, held, ~starting))][:n]
        sim.draining[chosen] = True
        self.retiring.update(chosen.tolist())
        self.counts["instances_drained"] += len(chosen)

    def requests_held(self) -> np.ndarray:
        """Per instance: the requests that refer to it (queued, on their way, decoding, migrating)."""
        sim = self.sim
        size = len(sim.alive)
        held = (np.bincount(sim.running.inst, minlength=size) + np.bincount(sim.inbox.inst, minlength=size)
                + np.bincount(sim.prefill.inst, minlength=size) + np.bincount(sim.prefill.dest, minlength=size))
        for _, _, src, dst, _ in sim.pending_migrations:
            held[src] += 1
            held[dst] += 1
        return held

    def remove_empty(self) -> bool:
        self.retiring = {i for i in self.retiring if self.sim.alive[i]}       # a spot kill may come first
        if not self.retiring:
            return False
        held = self.requests_held()
        empty = [i for i in sorted(self.retiring) if held[i] == 0]
        for i in empty:
            self.sim.remove_instance(i)
            self.retiring.discard(i)
        self.counts["instances_removed"] += len(empty)
        return bool(empty)
