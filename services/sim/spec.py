"""What `ferry sim` simulates: the cluster (pools, GPU types, engine limits, network), the policies, the
SLOs and the spot availability events — one YAML file (services/sim/configs/*.yaml are examples).

    model / profile      served model name; SimProfile name or YAML path (`ferry profile` writes one)
    pools                prefill / decode / colocated: {replicas, gpu}
    engine               block_size, num_blocks, max_num_seqs, max_num_batched_tokens, max_model_len
                         (EngineConfig's names; max_model_len 0 = the profile's)
    gpus                 per GPU type: price_per_hour (USD), idle_watts, peak_watts, model (h100-sxm | h200-sxm:
                         the clock range of the power model)
    network              kv_bandwidth_bytes_per_s, kv_latency_s (prefill → decode and migration copies)
    scheduler            routing (preset or YAML path), heartbeat_interval_s, migration_interval_s (0 = off),
                         migration_load_balance_gap, prefix_index_capacity, preemption (planner | reroute | restart)
    kvstore_blocks       blocks the kvstore keeps (LRU, trace-block granularity); 0 = no kvstore
    slo                  ttft_s, tpot_s (goodput and attainment)
    power_budget_watts   the power budget: drawn on the power plot, kept by the controller (0 = none)
    power                control (the controller on), interval_s (control period), thresholds and the other
                         policies.power.PowerConfig fields (PowerSpec)
    tick_s               the simulation step (default: the heartbeat interval)
    spot                 events: {at_s, preempt: instance id, notice_s} or {at_s, add: pool, replicas, startup_s}
    spot_market          generated spot events (spot_trace.py): pools (comma separated), provider, seed, ...
    autoscale            enabled, interval_s (control period), window_s (signal window), startup_s (decision
                         to serving), prefill / decode: {min_replicas, max_replicas}, and the other
                         policies.autoscale.AutoscaleConfig fields (headroom, attainment_target, ...)

Unknown keys are errors that name the key and where it may go.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from services.common.cluster import Role
from services.common.named_yaml import find_yaml
from services.scheduler.policies.autoscale import AutoscaleConfig, PoolBounds
from services.sim.spot_trace import SpotEvent, SpotMarket

__all__ = ["ClusterSpec", "SpotEvent", "SpotMarket", "load_spec", "spec_from_mapping"]
PREEMPTION_MODES = ("planner", "reroute", "restart")

CONFIGS = Path(__file__).parent / "configs"
POOL_ROLES = {"prefill": Role.PREFILL, "decode": Role.DECODE, "colocated": Role.BOTH}


@dataclass(frozen=True, slots=True)
class GpuType:
    price_per_hour: float = 0.0
    model: str = "h100-sxm"         # clock range and power curve (common/gpu_power.py)
    idle_watts: float = 0.0
    peak_watts: float = 0.0


@dataclass(frozen=True, slots=True)
class Pool:
    name: str            # prefill | decode | colocated
    replicas: int
    gpu: str

    @property
    def role(self) -> Role:
        return POOL_ROLES[self.name]


@dataclass(frozen=True, slots=True)
class EngineLimits:
    block_size: int = 16
    num_blocks: int = 1000
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0          # 0: the profile's


@dataclass(frozen=True, slots=True)
class PowerSpec:
    """The power controller in the simulator: every `interval_s`, the live policy (policies.power.decide)
    on the instances' simulated power against `power_budget_watts`; its caps lock the instances' SM clocks,
    and their steps slow with the clock (services/sim/power.py). The other fields are PowerConfig's."""
    control: bool = False
    interval_s: float = 5.0
    threshold1: float = 0.90
    threshold2: float = 0.95
    low_priority_pools: str = "decode"      # comma separated roles: prefill, decode, both
    uncap_margin: float = 0.05
    uncap_after_s: float = 30.0
    prefill_max_utilization: float = 0.7
    emergency_target: float = 0.90

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"power.interval_s must be > 0, got {self.interval_s}")


@dataclass(frozen=True, slots=True)
class AutoscaleSpec:
    """Autoscaling in the simulator: every `interval_s`, the pools' signals over the last `window_s` go to
    the live policy (`policy`); an instance it adds serves `startup_s` after the decision."""
    enabled: bool = False
    interval_s: float = 15.0
    window_s: float = 60.0
    startup_s: float = 60.0
    policy: AutoscaleConfig = field(default_factory=AutoscaleConfig)

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.window_s > 0 and self.startup_s >= 0):
            raise ValueError(f"autoscale: interval_s and window_s must be > 0 and startup_s >= 0, got "
                             f"{self.interval_s}, {self.window_s}, {self.startup_s}")


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    profile: str
    pools: tuple[Pool, ...]
    model: str = "model"
    engine: EngineLimits = EngineLimits()
    gpus: dict[str, GpuType] = field(default_factory=lambda: {"gpu": GpuType()})
    kv_bandwidth_bytes_per_s: float = 10e9
    kv_latency_s: float = 0.001
    routing: str = "ferry"
    heartbeat_interval_s: float = 0.1
    migration_interval_s: float = 0.0
    migration_load_balance_gap: float = 16.0
    # planner: a notice stops routing, evacuation plans each round; reroute: notices ignored, a killed instance's
    # requests recompute their tokens so far elsewhere; restart: the same, but they start again from scratch
    preemption: str = "planner"
    prefix_index_capacity: int = 1_000_000
    kvstore_blocks: int = 0
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    power_budget_watts: float = 0.0
    tick_s: float = 0.0            # 0: the heartbeat interval
    spot: tuple[SpotEvent, ...] = ()
    spot_market: SpotMarket = field(default_factory=SpotMarket)
    autoscale: AutoscaleSpec = AutoscaleSpec()
    power: PowerSpec = PowerSpec()

    def __post_init__(self) -> None:
        if self.autoscale.enabled and any(p.name == "colocated" for p in self.pools):
            raise ValueError("autoscale: only prefill and decode pools can be autoscaled; "
                             "remove the colocated pool or set autoscale.enabled: false")
        if not self.pools or sum(p.replicas for p in self.pools) == 0:
            raise ValueError("pools: give at least one instance (e.g. pools: {colocated: {replicas: 2}})")
        for p in self.pools:
            if p.gpu not in self.gpus:
                raise ValueError(f"pools.{p.name}.gpu {p.gpu!r} is not under gpus (have {sorted(self.gpus)})")
        for name in ("kv_bandwidth_bytes_per_s", "heartbeat_interval_s", "slo_ttft_s", "slo_tpot_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.tick_s < 0 or self.migration_interval_s < 0:
            raise ValueError("tick_s and migration_interval_s must be >= 0")
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"scheduler.preemption {self.preemption!r}: use one of {', '.join(PREEMPTION_MODES)}")
        if self.power.control and self.power_budget_watts <= 0:
            raise ValueError("power.control needs power_budget_watts > 0 (the budget the controller keeps)")
        unknown = set(self.spot_market.pool_names) - {p.name for p in self.pools}
        if unknown:
            raise ValueError(f"spot_market.pools names {sorted(unknown)}, not pools of this spec")
        if self.autoscale.enabled and self.spot_market.pool_names:
            raise ValueError("spot_market: its replacements name instances as the simulator adds them; "
                             "turn autoscale off (autoscale.enabled: false)")

    @property
    def tick(self) -> float:
        return self.tick_s or self.heartbeat_interval_s

    @property
    def disaggregated(self) -> bool:
        return any(p.name != "colocated" and p.replicas for p in self.pools)


def load_spec(path_or_name: str | Path, **overrides: Any) -> ClusterSpec:
    """A spec from YAML (a path, or a name under services/sim/configs), with top-level overrides."""
    path = find_yaml(path_or_name, CONFIGS, "cluster spec")
    data = yaml.safe_load(path.read_text()) or {}
    data.update(overrides)
    return spec_from_mapping(data, where=str(path))


def spec_from_mapping(data: dict[str, Any], where: str = "spec") -> ClusterSpec:
    data = dict(data)
    _check(data, {f.name for f in fields(ClusterSpec)} | {"slo", "network", "scheduler"}, where)
    if "profile" not in data:
        raise ValueError(f"{where}: 'profile' is required (a SimProfile name or YAML path)")
    gpus = {name: _build(GpuType, g or {}, f"{where}: gpus.{name}") for name, g in (data.pop("gpus", None)
                                                                                   or {"gpu": {}}).items()}
    default_gpu = next(iter(gpus))
    pools_data = data.pop("pools", None) or {}
    _check(pools_data, set(POOL_ROLES), f"{where}: pools")
    pools = tuple(Pool(name, int((p or {}).get("replicas", 0)), str((p or {}).get("gpu", default_gpu)))
                  for name, p in pools_data.items())
    for name, p in pools_data.items():
        _check(p or {}, {"replicas", "gpu"}, f"{where}: pools.{name}")
    flat = {}
    for section, keys in (("slo", {"ttft_s": "slo_ttft_s", "tpot_s": "slo_tpot_s"}),
                          ("network", {"kv_bandwidth_bytes_per_s": "kv_bandwidth_bytes_per_s",
                                       "kv_latency_s": "kv_latency_s"}),
                          ("scheduler", {k: k for k in ("routing", "heartbeat_interval_s", "migration_interval_s",
                                                        "migration_load_balance_gap", "preemption",
                                                        "prefix_index_capacity")})):
        sub = data.pop(section, None) or {}
        _check(sub, set(keys), f"{where}: {section}")
        flat.update({keys[k]: v for k, v in sub.items()})
    engine = _build(EngineLimits, data.pop("engine", None) or {}, f"{where}: engine")
    spot = tuple(_build(SpotEvent, e, f"{where}: spot[{i}]") for i, e in enumerate(data.pop("spot", None) or ()))
    autoscale = _autoscale(data.pop("autoscale", None) or {}, f"{where}: autoscale")
    market = _build(SpotMarket, data.pop("spot_market", None) or {}, f"{where}: spot_market")
    power = _build(PowerSpec, data.pop("power", None) or {}, f"{where}: power")
    for key, value in {**data, **flat}.items():
        if isinstance(value, str) and key not in ("profile", "model", "routing", "preemption"):
            try:
                flat[key] = float(value)
            except ValueError as e:
                raise ValueError(f"{where}: {key} must be a number, got {value!r}") from e
    merged = {**data, **flat}
    for key in ("prefix_index_capacity", "kvstore_blocks"):
        if key in merged:
            merged[key] = int(merged[key])
    return ClusterSpec(pools=pools, gpus=gpus, engine=engine, spot=spot, spot_market=market, autoscale=autoscale,
                       power=power, **merged)


def _autoscale(data: dict[str, Any], where: str) -> AutoscaleSpec:
    """The `autoscale:` section: the simulator's own keys, bounds per pool, then the policy's fields."""
    own = {f.name for f in fields(AutoscaleSpec)} - {"policy"}
    policy_fields = {f.name for f in fields(AutoscaleConfig)}
    _check(data, own | policy_fields, where)
    data = dict(data)
    bounds = {pool: _build(PoolBounds, data.pop(pool) or {}, f"{where}.{pool}")
              for pool in ("prefill", "decode") if pool in data}
    policy = _build(AutoscaleConfig, {k: data.pop(k) for k in policy_fields & set(data)}, where, **bounds)
    return _build(AutoscaleSpec, data, where, policy=policy)


def _build(cls: type, data: dict[str, Any], where: str, **given: Any):
    """`cls` from a mapping of its scalar fields (typed from the annotations), plus `given` as they are;
    a value the class rejects is an error at `where`."""
    _check(data, {f.name for f in fields(cls)} - set(given), where)
    typed = {}
    for f in fields(cls):
        if f.name in data:
            kind = {"float": float, "int": int, "str": str, "bool": _boolean,
                    "float | None": float}[f.type]           # an optional float given is a float
            try:
                value = kind(data[f.name])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}.{f.name}: {e}") from e
            if kind in (float, int) and not math.isfinite(value):
                raise ValueError(f"{where}.{f.name} must be finite, got {data[f.name]!r}")
            typed[f.name] = value
    try:
        return cls(**typed, **given)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def _check(data: Any, allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")  # noqa: TRY004 (a config error)
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
