"""The power controller: keep the GPUs that share a budget (the cluster, or one rack: call `decide` once
per group) under it, capping low-priority pools first (POLCA, ASPLOS'24) at the lowest SM clock whose
predicted TPOT still meets the SLO (throttLL'eM, HPCA'25). Pure: readings and time in, caps out.

    total power P vs budget B              what happens (caps only ever go DOWN while P > T1)
    ─────────────────────────────────────  ──────────────────────────────────────────────────────────────
    P > B                   emergency      every cappable GPU to the one clock at which the predicted total
                                           fits `emergency_target` x B (SLO ignored: the budget is hard)
    P > T2 = threshold2 x B threshold2     low- AND high-priority pools to their SLO clock
    P > T1 = threshold1 x B threshold1     low-priority pools (`low_priority_pools`, decode by default) to
                                           their SLO clock; high priority untouched
    P <= T1                 normal         caps stay; a cap whose SLO clock rose (more load) is raised if
                                           the predicted total stays <= T1. Once P has stayed below
                                           (threshold1 - uncap_margin) x B for `uncap_after_s`, uncap one
                                           priority group (high first), if the predicted total fits T1;
                                           the next group waits another `uncap_after_s`

SLO clock of an instance: the lowest clock (GpuSpec.clocks(), 15 MHz steps) at which its current decode
step, `StepCost.seconds_at(f / f_max)`, is within `tpot_slo_s`. An instance without a step model
(prefill) has no TPOT to keep; its work is compute-bound (busy share ~ 1/f), so its clock is the lowest
that keeps it at most `prefill_max_utilization` busy: its queue, and so TTFT, stays bounded, a lightly
loaded prefill GPU gives power back, and a saturated one is capped only in an emergency. Power at another clock is predicted from the reading with the model of
common/gpu_power.py: the busy share scales with the step time, the dynamic power with the clock
(`predicted_watts` errs high both ways, so neither a cap nor an uncap is decided on an optimistic guess).
A cap is a clock (for workers that lock clocks) and the matching power limit (full load at that clock,
for workers that set limits); `decide` returns the caps that should be in force, the executor applies
the differences (services/scheduler/power_controller.py).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.common.gpu_power import H100_SXM, GpuSpec, StepCost
from services.engine.sim_profile import SimProfile

IDLE_CONTEXT_TOKENS = 1024        # an idle decode instance is judged on one request of this length


class PowerLevel(enum.Enum):
    NORMAL = "normal"
    THRESHOLD1 = "threshold1"
    THRESHOLD2 = "threshold2"
    EMERGENCY = "emergency"


@dataclass(frozen=True, slots=True)
class PowerConfig:
    budget_watts: float
    gpu: GpuSpec = H100_SXM
    threshold1: float = 0.90
    threshold2: float = 0.95
    low_priority_pools: frozenset[str] = frozenset({"decode"})
    uncap_margin: float = 0.05
    uncap_after_s: float = 30.0
    tpot_slo_s: float = 0.1
    prefill_max_utilization: float = 0.7
    emergency_target: float = 0.90

    def __post_init__(self) -> None:
        if self.budget_watts <= 0:
            raise ValueError(f"power budget must be > 0 W, got {self.budget_watts}")
        if not 0 < self.threshold1 <= self.threshold2 <= 1:
            raise ValueError(f"need 0 < threshold1 ({self.threshold1}) <= threshold2 ({self.threshold2}) <= 1")
        if not 0 <= self.uncap_margin < self.threshold1 or self.uncap_after_s < 0:
            raise ValueError(f"need 0 <= uncap margin ({self.uncap_margin}) < threshold1 and uncap-after >= 0 s")
        if not 0 < self.prefill_max_utilization <= 1:
            raise ValueError(f"need 0 < prefill max utilization ({self.prefill_max_utilization}) <= 1")
        if not 0 < self.emergency_target <= 1 or self.tpot_slo_s <= 0:
            raise ValueError("need 0 < emergency target <= 1 and a TPOT SLO > 0")

    def is_low_priority(self, pool: str) -> bool:
        return pool in self.low_priority_pools


@dataclass(frozen=True, slots=True)
class GpuInstance:
    """One GPU as the controller sees it this round."""
    instance_id: str
    pool: str                            # prefill | decode | both
    power_watts: float
    step: StepCost | None = None         # its decode step at the maximum clock (None: no latency model)
    can_cap: bool = True                 # False: a read-only GPU; its power still counts


@dataclass(frozen=True, slots=True)
class PowerCap:
    instance_id: str
    pool: str
    clock_mhz: float
    watts: float                         # the same cap as a power limit
    reason: str                          # the PowerLevel value that set it


@dataclass(frozen=True, slots=True)
class PowerState:
    caps: tuple[PowerCap, ...] = ()      # in force, by instance id
    calm_since: float | None = None      # power below the uncap line since (clock seconds)


@dataclass(frozen=True, slots=True)
class PowerDecision:
    level: PowerLevel
    total_watts: float
    caps: tuple[PowerCap, ...]           # every cap that should be in force now
    changed_ids: tuple[str, ...] = field(default=())    # instances whose cap changed (or was removed)


def decide(config: PowerConfig, instances: tuple[GpuInstance, ...], state: PowerState,
           now: float) -> tuple[PowerDecision, PowerState]:
    by_id = {i.instance_id: i for i in instances}
    caps = {c.instance_id: c for c in state.caps if c.instance_id in by_id and by_id[c.instance_id].can_cap}
    total = sum(i.power_watts for i in instances)
    level = power_level(config, total)
    calm_since = None
    if level is PowerLevel.EMERGENCY:
        clock = fitting_clock(config, instances, caps, config.emergency_target * config.budget_watts)
        for i in instances:
            _lower(config, caps, i, clock, level)
    elif level is not PowerLevel.NORMAL:
        for i in instances:
            if config.is_low_priority(i.pool) or level is PowerLevel.THRESHOLD2:
                now_mhz = caps[i.instance_id].clock_mhz if i.instance_id in caps else None
                _lower(config, caps, i, slo_clock(config, i, now_mhz), level)
    else:
        caps = _raise_for_slo(config, instances, caps)
        calm = total < (config.threshold1 - config.uncap_margin) * config.budget_watts
        calm_since = (state.calm_since if state.calm_since is not None else now) if calm else None
        if calm and caps and now - calm_since >= config.uncap_after_s:
            uncapped = _uncap_one_group(config, instances, caps)
            if uncapped is not caps:
                caps, calm_since = uncapped, now
    before = {c.instance_id: c.clock_mhz for c in state.caps}
    after = {k: c.clock_mhz for k, c in caps.items()}
    changed = tuple(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))
    ordered = tuple(caps[k] for k in sorted(caps))
    return PowerDecision(level, total, ordered, changed), PowerState(ordered, calm_since)


def power_level(config: PowerConfig, total_watts: float) -> PowerLevel:
    budget = config.budget_watts
    if total_watts > budget:
        return PowerLevel.EMERGENCY
    if total_watts > config.threshold2 * budget:
        return PowerLevel.THRESHOLD2
    if total_watts > config.threshold1 * budget:
        return PowerLevel.THRESHOLD1
    return PowerLevel.NORMAL


def decode_step(profile: SimProfile, can_decode: bool, num_running: int, num_context_tokens: float) -> StepCost | None:
    """An instance's decode step at the maximum clock, from its batch (prefill-only: None, no TPOT to keep;
    idle: one request of IDLE_CONTEXT_TOKENS)."""
    if not can_decode:
        return None
    if num_running == 0:
        return profile.decode_cost(1, IDLE_CONTEXT_TOKENS)
    return profile.decode_cost(num_running, int(num_context_tokens))


def slo_clock(config: PowerConfig, instance: GpuInstance, now_mhz: float | None = None) -> float:
    """The lowest clock whose predicted TPOT meets the SLO (the maximum if none does); without a step
    model, the lowest that keeps the GPU, read at `now_mhz` (None: uncapped), at most
    `prefill_max_utilization` busy."""
    gpu = config.gpu
    if instance.step is None:
        busy = gpu.utilization_at(instance.power_watts, now_mhz)
        needed = busy * (now_mhz or gpu.max_clock_mhz) / config.prefill_max_utilization
        return min((c for c in gpu.clocks() if c >= needed), default=gpu.max_clock_mhz)
    best = gpu.max_clock_mhz
    for clock in gpu.clocks():                       # highest first; the step time only grows
        if instance.step.seconds_at(gpu.clock_ratio(clock)) > config.tpot_slo_s:
            break
        best = clock
    return best


def predicted_watts(config: PowerConfig, instance: GpuInstance, now_mhz: float | None, clock_mhz: float | None) -> float:
    """Its power at `clock_mhz` (None: uncapped), from its reading at `now_mhz`, erring high both ways: at a
    lower clock the same work keeps the GPU busy longer (by its step model; without one the work is taken
    as compute-bound, busy ~ 1/f), at a higher clock the busy share is taken as unchanged (a saturated
    batch stays saturated)."""
    gpu = config.gpu
    busy = gpu.utilization_at(instance.power_watts, now_mhz)
    r_now, r_new = gpu.clock_ratio(now_mhz), gpu.clock_ratio(clock_mhz)
    if instance.step is not None:
        stretch = instance.step.seconds_at(r_new) / instance.step.seconds_at(r_now)
    else:
        stretch = r_now / r_new
    return gpu.power_watts(min(1.0, busy * max(1.0, stretch)), clock_mhz)


def fitting_clock(config: PowerConfig, instances: tuple[GpuInstance, ...], caps: dict[str, PowerCap],
                  target_watts: float) -> float:
    """The highest clock at which the predicted total (every cappable GPU at most that clock) fits."""
    def total_at(clock: float) -> float:
        out = 0.0
        for i in instances:
            now = caps[i.instance_id].clock_mhz if i.instance_id in caps else None
            if not i.can_cap:
                out += i.power_watts
            else:
                out += predicted_watts(config, i, now, clock if now is None else min(now, clock))
        return out
    return next((c for c in config.gpu.clocks() if total_at(c) <= target_watts), config.gpu.min_clock_mhz)


def _lower(config: PowerConfig, caps: dict[str, PowerCap], instance: GpuInstance, clock: float,
           level: PowerLevel) -> None:
    """Cap at `clock` unless it is capped lower already (caps only go down above T1)."""
    current = caps.get(instance.instance_id)
    if not instance.can_cap or clock >= config.gpu.max_clock_mhz or \
            (current is not None and current.clock_mhz <= clock):
        return
    caps[instance.instance_id] = _cap(config, instance, clock, level.value)


def _cap(config: PowerConfig, instance: GpuInstance, clock: float, reason: str) -> PowerCap:
    return PowerCap(instance.instance_id, instance.pool, clock, config.gpu.power_limit_for(clock), reason)


def _raise_for_slo(config: PowerConfig, instances: tuple[GpuInstance, ...],
                   caps: dict[str, PowerCap]) -> dict[str, PowerCap]:
    """Below T1: raise caps that now miss the SLO (more load arrived), while the prediction fits T1."""
    caps = dict(caps)
    limit = config.threshold1 * config.budget_watts
    total = sum(i.power_watts for i in instances)
    for i in instances:
        cap = caps.get(i.instance_id)
        if cap is None:
            continue
        wanted = slo_clock(config, i, cap.clock_mhz)
        if wanted <= cap.clock_mhz:
            continue
        extra = predicted_watts(config, i, cap.clock_mhz, wanted) - i.power_watts
        if total + extra <= limit:
            total += extra
            caps[i.instance_id] = _cap(config, i, wanted, cap.reason) if wanted < config.gpu.max_clock_mhz \
                else None
    return {k: v for k, v in caps.items() if v is not None}


def _uncap_one_group(config: PowerConfig, instances: tuple[GpuInstance, ...],
                     caps: dict[str, PowerCap]) -> dict[str, PowerCap]:
    """Remove the caps of the high-priority group, or of the low one when high has none, if the
    predicted total stays within T1; else the caps unchanged (the same object)."""
    high = [k for k, c in caps.items() if not config.is_low_priority(c.pool)]
    group = set(high or caps)
    total = sum(predicted_watts(config, i, caps[i.instance_id].clock_mhz, None) if i.instance_id in group
                else i.power_watts for i in instances)
    if total > config.threshold1 * config.budget_watts:
        return caps
    return {k: c for k, c in caps.items() if k not in group}
