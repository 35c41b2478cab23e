"""Spot availability traces: when a cloud reclaims the simulator's spot instances, and when their
replacements arrive. Seeded and deterministic: a market, pool sizes, a duration and a seed give the
same events every time.

The model (docs/simulator.md#spot-availability-traces) follows what the spot-serving papers measured
on AWS and GCP (SpotServe, ASPLOS'24; SkyServe): preemptions are rare most of the time, then come in
bursts that take several instances of one zone within seconds, while the other zones stay calm.

    zone state      a two-state Markov chain per zone: calm <-> turbulent, exponential holding times
                    (means `calm_mean_s`, `turbulent_mean_s`); zones are independent
    calm            each instance is reclaimed at `calm_rate_per_hour` (Poisson, independent)
    turbulent       bursts arrive at `burst_rate_per_hour`; a burst reclaims each live instance of the
                    zone with probability `burst_fraction`, their notices spread over `burst_spread_s`
    notice          a reclaimed instance gets `notice_s` of warning (gcp/azure 30 s, aws 120 s), then dies
    replacement     requested at the notice; granted after an exponential wait (mean `acquire_mean_s`) in
                    a calm zone (the freest), or, while every zone is turbulent, once one calms down;
                    it serves `startup_s` after it is granted (boot, weights, warm-up) and is paid from then

Instances are spread over the zones round-robin. A replacement takes the next id of its pool, as the
simulator names added instances (`{pool}-{k:04d}`), so a spec with a spot market must not add instances
of those pools any other way (no autoscaling of a spot pool).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

NOTICE_S = {"gcp": 30.0, "azure": 30.0, "aws": 120.0}
STEP_S = 1.0                        # the generator's time step (event times are exact, not rounded)


@dataclass(frozen=True, slots=True)
class SpotEvent:
    """At `at_s`: `preempt` names an instance that gets a notice and dies `notice_s` later; or `add`
    names a pool that gains `replicas` instances, serving `startup_s` later."""
    at_s: float
    preempt: str = ""
    notice_s: float = 30.0
    add: str = ""
    replicas: int = 1
    startup_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SpotMarket:
    """The availability model's parameters (module docstring); `pools` names the spot pools, comma
    separated ("" = none: the market is off)."""
    pools: str = ""
    provider: str = "gcp"               # gcp | azure | aws: the notice's length
    notice_s: float = 0.0               # 0: the provider's
    num_zones: int = 3
    calm_mean_s: float = 1800.0
    turbulent_mean_s: float = 300.0
    calm_rate_per_hour: float = 0.05
    burst_rate_per_hour: float = 12.0
    burst_fraction: float = 0.5
    burst_spread_s: float = 10.0
    acquire_mean_s: float = 30.0
    startup_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.provider not in NOTICE_S:
            raise ValueError(f"spot_market.provider {self.provider!r}: use one of {', '.join(NOTICE_S)}")
        if self.num_zones < 1 or not 0 <= self.burst_fraction <= 1:
            raise ValueError("spot_market: need num_zones >= 1 and 0 <= burst_fraction <= 1")
        for name in ("calm_mean_s", "turbulent_mean_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"spot_market.{name} must be > 0, got {getattr(self, name)}")
        for name in ("notice_s", "calm_rate_per_hour", "burst_rate_per_hour", "burst_spread_s", "acquire_mean_s",
                     "startup_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"spot_market.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def pool_names(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.pools.split(",") if p.strip())

    @property
    def grace_s(self) -> float:
        return self.notice_s or NOTICE_S[self.provider]


@dataclass(slots=True)
class _Instance:
    name: str
    pool: str
    zone: int


def generate(market: SpotMarket, pool_sizes: dict[str, int], duration_s: float) -> tuple[SpotEvent, ...]:
    """The market's events over [0, duration_s) for spot pools of `pool_sizes` instances at time 0,
    sorted by time."""
    rng = np.random.default_rng(market.seed)
    zones = _zone_states(market, rng, duration_s)
    live: list[_Instance] = []
    next_index = dict(pool_sizes)
    for pool in market.pool_names:
        for k in range(pool_sizes.get(pool, 0)):
            live.append(_Instance(f"{pool}-{k:04d}", pool, len(live) % market.num_zones))
    events: list[SpotEvent] = []
    grants: list[tuple[float, int, str]] = []        # (granted at, tie-break, pool): replacements on the way
    calm_p = market.calm_rate_per_hour * STEP_S / 3600
    burst_p = market.burst_rate_per_hour * STEP_S / 3600
    for step in range(math.ceil(duration_s / STEP_S)):
        t = step * STEP_S
        while grants and grants[0][0] < t + STEP_S:
            at, _, pool = heapq.heappop(grants)
            name = f"{pool}-{next_index[pool]:04d}"
            next_index[pool] += 1
            live.append(_Instance(name, pool, _freest_calm_zone(live, zones, at)))
            events.append(SpotEvent(at_s=at, add=pool, replicas=1, startup_s=market.startup_s))
        reclaimed: list[tuple[float, _Instance]] = []
        for zone in range(market.num_zones):
            mine = [i for i in live if i.zone == zone]
            if not mine:
                continue
            if _is_turbulent(zones[zone], t):
                if rng.random() < burst_p:
                    hit = [i for i in mine if rng.random() < market.burst_fraction]
                    reclaimed += [(t + rng.uniform(0, market.burst_spread_s), i) for i in hit]
            else:
                reclaimed += [(t + rng.uniform(0, STEP_S), i) for i in mine if rng.random() < calm_p]
        for at, instance in sorted(reclaimed, key=lambda x: x[0]):
            live.remove(instance)
            events.append(SpotEvent(at_s=at, preempt=instance.name, notice_s=market.grace_s))
            granted = _calm_from(zones, at) + rng.exponential(market.acquire_mean_s)
            heapq.heappush(grants, (granted, len(events), instance.pool))
    return tuple(sorted((e for e in events if e.at_s < duration_s), key=lambda e: e.at_s))


def _zone_states(market: SpotMarket, rng: np.random.Generator, duration_s: float) -> list[list[tuple[float, float]]]:
    """Per zone, its turbulent intervals [start, end) over the duration (and some after it). A zone
    starts in its stationary distribution: turbulent with probability turbulent / (calm + turbulent)."""
    share = market.turbulent_mean_s / (market.calm_mean_s + market.turbulent_mean_s)
    out = []
    for _ in range(market.num_zones):
        turbulent = rng.random() < share
        t, intervals = 0.0, []
        while t < 2 * duration_s + 3600:
            hold = rng.exponential(market.turbulent_mean_s if turbulent else market.calm_mean_s)
            if turbulent:
                intervals.append((t, t + hold))
            t, turbulent = t + hold, not turbulent
        out.append(intervals)
    return out


def _is_turbulent(intervals: list[tuple[float, float]], t: float) -> bool:
    return any(start <= t < end for start, end in intervals)


def _calm_from(zones: list[list[tuple[float, float]]], t: float) -> float:
    """The first time >= t at which some zone is calm."""
    while True:
        ends = [end for intervals in zones for start, end in intervals if start <= t < end]
        if len(ends) < len(zones):
            return t
        t = min(ends)


def _freest_calm_zone(live: list[_Instance], zones: list[list[tuple[float, float]]], t: float) -> int:
    """The calm zone with the fewest live instances (ties: the lowest number); any zone if none is calm."""
    calm = [z for z in range(len(zones)) if not _is_turbulent(zones[z], t)] or list(range(len(zones)))
    return min(calm, key=lambda z: (sum(i.zone == z for i in live), z))


def availability(events: tuple[SpotEvent, ...], pool_sizes: dict[str, int], market: SpotMarket,
                 duration_s: float, step_s: float = 1.0) -> np.ndarray:
    """Spot instances serving at each step of [0, duration_s): the initial ones, minus the reclaimed
    (from their deadline; routing stops at the notice), plus replacements once started."""
    t = np.arange(0.0, duration_s, step_s)
    count = np.full(len(t), sum(pool_sizes.get(p, 0) for p in market.pool_names), np.int64)
    for e in events:
        if e.preempt:
            count -= t >= e.at_s + e.notice_s
        else:
            count += e.replicas * (t >= e.at_s + e.startup_s)
    return count


def describe(events: tuple[SpotEvent, ...], pool_sizes: dict[str, int], market: SpotMarket,
             duration_s: float, burst_gap_s: float = 60.0) -> dict:
    """The trace's realism figures: preemptions per instance-hour, bursts (notices closer than
    `burst_gap_s` to the previous one), availability, replacement delays."""
    notices = sorted(e.at_s for e in events if e.preempt)
    adds = [e for e in events if e.add]
    bursts: list[int] = []
    for k, at in enumerate(notices):
        if k and at - notices[k - 1] < burst_gap_s:
            bursts[-1] += 1
        else:
            bursts.append(1)
    serving = availability(events, pool_sizes, market, duration_s)
    initial = sum(pool_sizes.get(p, 0) for p in market.pool_names)
    hours = float(serving.mean()) * duration_s / 3600 if len(serving) else 0.0
    return {"notices": len(notices), "replacements": len(adds), "grace_s": market.grace_s,
            "preemptions_per_instance_hour": len(notices) / hours if hours else 0.0,
            "bursts": len(bursts), "largest_burst": max(bursts, default=0),
            "mean_burst": float(np.mean(bursts)) if bursts else 0.0,
            "initial_instances": initial, "min_serving": int(serving.min(initial=initial)),
            "mean_serving": float(serving.mean()) if len(serving) else float(initial)}
