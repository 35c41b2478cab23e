"""Autoscaling, a pure policy: pool signals (from Prometheus or the built-in scraper) -> replica targets.

Prefill and decode are sized separately, each from its own SLO (DistServe/Splitwise):

    prefill   TTFT attainment, requests waiting for their first token, prompt-token demand
    decode    TPOT attainment, KV-cache utilization, requests running per instance

Each target starts from the modeled need, demand over per-instance goodput (`capacity.py`: the
requests/s one instance serves within the SLO, from the engine's performance profile), times the pool's
headroom (`prefill_headroom` / `decode_headroom`, each `headroom` unless set). With `trend_window_s`
set, a rising need is projected `trend_horizon_s` ahead (about an instance's start-up): the slope of
the need over the last `trend_window_s`, fitted to the needs of earlier calls kept in the state, so a
climb is provisioned for before it arrives rather than a start-up after. A falling need is not
projected: scale-in waits for the need itself. Feedback then corrects the model: a pool that misses its
SLO, queues or fills its KV cache gets at least one more replica than it has, unless replicas are still
starting (`PoolSignals.starting`): those are the correction already under way, and asking for another
each interval until they serve would wind the pool far past its need. A target above the current count is applied once it has held for `scale_up_after_s`; below, once
it has held for `scale_down_after_s` (hysteresis as durations; the platform then drains before it
removes, so scale-in loses nothing). Bounds clamp last.

    decide(config, signals, state, now) -> (decisions, state)

`AutoscaleState` carries the recommendation and the hysteresis timers between calls; the caller keeps
it and passes it back. A recommendation is an absolute size that includes replicas still starting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

POOLS = ("prefill", "decode")


@dataclass(frozen=True, slots=True)
class PoolBounds:
    min_replicas: int = 1
    max_replicas: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replica bounds [{self.min_replicas}, {self.max_replicas}]: need "
                             "0 <= min_replicas <= max_replicas")

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    prefill: PoolBounds = PoolBounds()
    decode: PoolBounds = PoolBounds()
    attainment_target: float = 0.95      # fraction of finished requests within the pool's SLO
    headroom: float = 1.2                # capacity provisioned per unit of modeled demand (both pools)
    prefill_headroom: float | None = None  # the prefill pool's, when it differs (None: `headroom`)
    decode_headroom: float | None = None   # the decode pool's, when it differs (None: `headroom`)
    safety: float = 0.0                  # plus this many times sqrt(need) instances (both pools)
    prefill_safety: float | None = None  # the prefill pool's, when it differs (None: `safety`)
    decode_safety: float | None = None   # the decode pool's, when it differs (None: `safety`)
    trend_window_s: float = 0.0          # fit the need's slope over this much history (0: no projection)
    trend_horizon_s: float = 0.0         # project a rising need this far ahead (~ an instance's start-up)
    kv_utilization_high: float = 0.85    # decode: scale out above this mean KV use
    queue_per_instance_high: float = 4.0 # prefill: scale out above this many waiting requests each
    scale_up_after_s: float = 15.0       # a higher target must hold this long before it applies
    scale_down_after_s: float = 120.0    # a lower target must hold this long before it applies
    max_step_down: int = 1               # replicas removed per decision at most (each one drains)

    def __post_init__(self) -> None:
        if not 0 < self.attainment_target <= 1:
            raise ValueError(f"attainment_target {self.attainment_target}: use a fraction in (0, 1]")
        for name in ("headroom", "prefill_headroom", "decode_headroom"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} {value}: use >= 1 (capacity per unit of demand)")
        for name in ("safety", "prefill_safety", "decode_safety"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} {value}: use >= 0 (instances per square root of the need)")
        if self.trend_window_s < 0 or self.trend_horizon_s < 0:
            raise ValueError("trend_window_s and trend_horizon_s must be >= 0 (seconds; 0 = no projection)")
        if not 0 < self.kv_utilization_high <= 1:
            raise ValueError(f"kv_utilization_high {self.kv_utilization_high}: use a fraction in (0, 1]")
        if self.scale_up_after_s < 0 or self.scale_down_after_s < 0:
            raise ValueError("scale_up_after_s and scale_down_after_s must be >= 0 (seconds)")
        if self.max_step_down < 1:
            raise ValueError(f"max_step_down {self.max_step_down}: use >= 1")

    def bounds(self, pool: str) -> PoolBounds:
        return self.prefill if pool == "prefill" else self.decode

    def pool_headroom(self, pool: str) -> float:
        own = self.prefill_headroom if pool == "prefill" else self.decode_headroom
        return self.headroom if own is None else own

    def pool_safety(self, pool: str) -> float:
        own = self.prefill_safety if pool == "prefill" else self.decode_safety
        return self.safety if own is None else own

    def provision(self, pool: str, need: float) -> int:
        """Instances to run for `need` modeled instances: need x headroom + safety x sqrt(need)."""
        return math.ceil(need * self.pool_headroom(pool) + self.pool_safety(pool) * math.sqrt(max(0.0, need)) - 1e-9)


@dataclass(frozen=True, slots=True)
class PoolSignals:
    """What one pool looks like over the last window. `None` = no data (nothing finished, or no
    source for it); a signal without data never triggers anything."""
    replicas: int                        # instances not draining: serving, and starting where known
    demand_rps: float | None = None      # requests/s arriving for this pool
    capacity_rps: float | None = None    # requests/s one instance serves within the SLO (capacity.py)
    slo_attainment: float | None = None  # prefill: TTFT; decode: TPOT
    waiting_per_instance: float | None = None
    kv_utilization: float | None = None  # mean over the pool, 0..1
    starting: int = 0                    # of `replicas`, those not serving yet (added, still starting)


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    pool: str
    current: int
    target: int           # what the signals ask for now (after bounds)
    desired: int          # what to run: the target once its hysteresis held, else the previous recommendation
    reason: str           # demand | slo | queue | kv | idle | bounds | steady


@dataclass(frozen=True, slots=True)
class AutoscaleState:
    """Between calls: the size recommended per pool, the hysteresis timer of a pending change
    (direction, since when), and the modeled need of recent calls (time, instances), for the trend."""
    desired: dict[str, int] = field(default_factory=dict)
    pending: dict[str, tuple[int, float]] = field(default_factory=dict)
    history: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)


def decide(config: AutoscaleConfig, signals: dict[str, PoolSignals], state: AutoscaleState,
           now: float) -> tuple[list[ScaleDecision], AutoscaleState]:
    """Targets are compared with the size recommended before, not with the instances registered now: a
    replica the platform is still starting counts as there, so a recommendation is never taken back
    just because the instance it asked for has not come up yet."""
    decisions, pending, recommended, history = [], dict(state.pending), dict(state.desired), dict(state.history)
    for pool in POOLS:
        if pool not in signals:
            continue
        s = signals[pool]
        desired = config.bounds(pool).clamp(recommended.get(pool, s.replicas))
        need = modeled_need(s)
        if config.trend_window_s > 0:
            kept = tuple(h for h in history.get(pool, ()) if now - h[0] < config.trend_window_s and h[0] < now)
            history[pool] = (*kept, (now, need)) if need is not None else kept
        target, reason = pool_target(config, pool, s, rising_need(config, history.get(pool, ()), need))
        direction = (target > desired) - (target < desired)
        if direction == 0:
            pending.pop(pool, None)
        else:
            since = pending[pool][1] if pending.get(pool, (0, 0.0))[0] == direction else now
            pending[pool] = (direction, since)
            if now - since >= (config.scale_up_after_s if direction > 0 else config.scale_down_after_s):
                desired = target if direction > 0 else max(target, desired - config.max_step_down)
                pending.pop(pool)
        recommended[pool] = desired
        decisions.append(ScaleDecision(pool, s.replicas, target, desired, reason))
    return decisions, AutoscaleState(desired=recommended, pending=pending, history=history)


def modeled_need(s: PoolSignals) -> float | None:
    """Instances the demand needs at the modeled goodput, before headroom; None without the data."""
    if s.demand_rps is None or not s.capacity_rps:
        return None
    return s.demand_rps / s.capacity_rps


def rising_need(config: AutoscaleConfig, history: tuple[tuple[float, float], ...], need: float | None) -> float | None:
    """The need projected `trend_horizon_s` ahead along its least-squares slope over the history, when
    that slope rises and the history spans at least half the trend window; else the need as it is."""
    if need is None or config.trend_window_s <= 0 or config.trend_horizon_s <= 0 or len(history) < 3:
        return need
    times = [t for t, _ in history]
    if times[-1] - times[0] < config.trend_window_s / 2:
        return need
    mean_t, mean_n = sum(times) / len(times), sum(n for _, n in history) / len(history)
    spread = sum((t - mean_t) ** 2 for t in times)
    slope = sum((t - mean_t) * (n - mean_n) for t, n in history) / spread
    return need + max(0.0, slope) * config.trend_horizon_s


def pool_target(config: AutoscaleConfig, pool: str, s: PoolSignals,
                need: float | None = None) -> tuple[int, str]:
    """The replica count the signals ask for (bounded), and the signal that decided it. `need`: the
    instances to provision for before headroom (the trend's projection); by default demand / goodput."""
    bounds = config.bounds(pool)
    target, reason = s.replicas, "steady"
    need = modeled_need(s) if need is None else need
    if s.demand_rps == 0:
        target, reason = 0, "idle"
    elif need is not None:
        target = config.provision(pool, need)
        reason = "demand" if target != s.replicas else "steady"
    for missed, why in ((s.slo_attainment is not None and s.slo_attainment < config.attainment_target, "slo"),
                        (pool == "prefill" and s.waiting_per_instance is not None
                         and s.waiting_per_instance > config.queue_per_instance_high, "queue"),
                        (pool == "decode" and s.kv_utilization is not None
                         and s.kv_utilization > config.kv_utilization_high, "kv")):
        if missed and target <= s.replicas:
            # one more than it has; while replicas still start, keep them (no windup) and ask no more
            target, reason = s.replicas + (0 if s.starting > 0 else 1), why
            break
    bounded = bounds.clamp(target)
    if bounded != target:
        reason = "bounds"
    return bounded, reason
