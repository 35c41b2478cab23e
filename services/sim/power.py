"""Power in the simulator: the instances' GPU power from the model of common/gpu_power.py, the live power
controller (`policies.power.decide`) on it every control period, and the budget's overshoot.

    reading      each instance's power at its clock for its busy share averaged over the last second
                 (an exponential average, time constant READING_S: NVML's power reading is a ~1 s mean)
    every power.interval_s (the control period):
                 GpuInstance per alive instance (its pool's role, the reading, its decode step at the
                 maximum clock from the profile, as the scheduler's PowerController builds it)
                 -> decide -> each cap locks the instance's SM clock; its steps slow with the clock
                 (SimProfile.seconds(..., clock_ratio), the sim engine's model)
    overshoot    the cluster's mean power over each second against the budget; an episode is a run of
                 seconds above it, reported in control periods (the goal: at most one)
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from services.common.gpu_power import GpuSpec, gpu_spec
from services.scheduler.policies.power import GpuInstance, PowerConfig, PowerState, decide, decode_step

if TYPE_CHECKING:
    from services.sim.simulator import Simulator
    from services.sim.spec import ClusterSpec, GpuType

READING_S = 1.0


def pool_gpu(gpu: GpuType) -> GpuSpec:
    """The power model of a spec's GPU type: its model's clocks, the spec's idle and peak watts."""
    spec = gpu_spec(gpu.model)
    return dataclasses.replace(spec, idle_watts=gpu.idle_watts, peak_watts=gpu.peak_watts,
                               min_power_limit_watts=min(spec.min_power_limit_watts, gpu.peak_watts))


def instance_watts(gpu: GpuSpec, busy: np.ndarray, clock_ratio: np.ndarray) -> np.ndarray:
    """GpuSpec.power_watts over arrays: busy share and f / f_max per instance."""
    scale = gpu.k_mem + (1 - gpu.k_mem) * clock_ratio ** gpu.alpha
    return gpu.idle_watts + gpu.dynamic_watts * np.clip(busy, 0.0, 1.0) * scale


def power_config(spec: ClusterSpec) -> PowerConfig:
    p = spec.power
    return PowerConfig(budget_watts=spec.power_budget_watts, gpu=pool_gpu(spec.gpus[spec.pools[0].gpu]),
                       threshold1=p.threshold1, threshold2=p.threshold2,
                       low_priority_pools=frozenset(x.strip() for x in p.low_priority_pools.split(",") if x.strip()),
                       uncap_margin=p.uncap_margin, uncap_after_s=p.uncap_after_s, tpot_slo_s=spec.slo_tpot_s,
                       prefill_max_utilization=p.prefill_max_utilization, emergency_target=p.emergency_target)


class PowerLoop:
    """The controller's rounds on a simulator (when `power.control`), and the overshoot bookkeeping
    (whenever there is a budget)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        spec = sim.spec
        self.budget = spec.power_budget_watts
        self.interval_s = spec.power.interval_s
        self.config = power_config(spec) if spec.power.control else None
        self.state = PowerState()
        self.next_round_s = 0.0
        self.levels: Counter = Counter()
        self.cap_changes = 0
        self.episodes: list[float] = []          # seconds above the budget, per episode
        self._over_s = 0.0

    def tick(self, now: float) -> None:
        """A controller round when one is due: caps in, instance clocks out."""
        if self.config is None or now < self.next_round_s:
            return
        self.next_round_s = now + self.interval_s
        sim = self.sim
        rows = np.flatnonzero(sim.alive)
        sum_ctx = sim.dec_base + sim.dec_n * sim.dec_steps
        instances = tuple(GpuInstance(sim.ids[i], sim.pool_of[i].role.value, float(sim.reading_watts[i]),
                                      decode_step(sim.profile, bool(sim.can_decode[i]), int(sim.dec_n[i]),
                                                  float(sum_ctx[i])))
                          for i in rows.tolist())
        decision, self.state = decide(self.config, instances, self.state, now)
        self.levels[decision.level.value] += 1
        self.cap_changes += len(decision.changed_ids)
        caps = {c.instance_id: c.clock_mhz for c in decision.caps}
        gpu = self.config.gpu
        for i in rows.tolist():
            sim.clock_ratio[i] = gpu.clock_ratio(caps.get(sim.ids[i]))

    def observe_second(self, mean_watts: float) -> None:
        """One second's mean cluster power: extend or close an overshoot episode."""
        if self.budget <= 0:
            return
        if mean_watts > self.budget:
            self._over_s += 1.0
        elif self._over_s:
            self.episodes.append(self._over_s)
            self._over_s = 0.0

    def summary(self) -> dict:
        episodes = self.episodes + ([self._over_s] if self._over_s else [])
        longest = max(episodes, default=0.0)
        return {"budget_watts": self.budget, "control": self.config is not None, "interval_s": self.interval_s,
                "rounds": sum(self.levels.values()), "levels": dict(self.levels), "cap_changes": self.cap_changes,
                "overshoot_episodes": len(episodes), "overshoot_s": float(sum(episodes)),
                "longest_overshoot_s": longest, "longest_overshoot_periods": longest / self.interval_s}
