"""What `ferry sim` simulates: the cluster (pools, GPU types, engine limits, network), the policies, the
SLOs and the spot availability events — one YAML file (services/sim/configs/*.yaml are examples).

    model / profile      served model name; SimProfile name or YAML path (`ferry profile` writes one)
    pools                prefill / decode / colocated: {replicas, gpu}
    engine               block_size, num_blocks, max_num_seqs, max_num_batched_tokens, max_model_len
                         (EngineConfig's names; max_model_len 0 = the profile's)
    gpus                 per GPU type: price_per_hour (USD), idle_watts, peak_watts
    network              kv_bandwidth_bytes_per_s, kv_latency_s (prefill → decode and migration copies)
    scheduler            routing (preset or YAML path), heartbeat_interval_s, migration_interval_s (0 = off),
                         migration_load_balance_gap, prefix_index_capacity
    kvstore_blocks       blocks the kvstore keeps (LRU, trace-block granularity); 0 = no kvstore
    slo                  ttft_s, tpot_s (goodput and attainment)
    power_budget_watts   drawn on the power plot (0 = none)
    tick_s               the simulation step (default: the heartbeat interval)
    spot                 events: {at_s, preempt: instance id, notice_s} or {at_s, add: pool, replicas, startup_s}

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

CONFIGS = Path(__file__).parent / "configs"
POOL_ROLES = {"prefill": Role.PREFILL, "decode": Role.DECODE, "colocated": Role.BOTH}


@dataclass(frozen=True, slots=True)
class GpuType:
    price_per_hour: float = 0.0
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
    prefix_index_capacity: int = 1_000_000
    kvstore_blocks: int = 0
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    power_budget_watts: float = 0.0
    tick_s: float = 0.0            # 0: the heartbeat interval
    spot: tuple[SpotEvent, ...] = ()

    def __post_init__(self) -> None:
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
                                                        "migration_load_balance_gap", "prefix_index_capacity")})):
        sub = data.pop(section, None) or {}
        _check(sub, set(keys), f"{where}: {section}")
        flat.update({keys[k]: v for k, v in sub.items()})
    engine = _build(EngineLimits, data.pop("engine", None) or {}, f"{where}: engine")
    spot = tuple(_build(SpotEvent, e, f"{where}: spot[{i}]") for i, e in enumerate(data.pop("spot", None) or ()))
    for key, value in {**data, **flat}.items():
        if isinstance(value, str) and key not in ("profile", "model", "routing"):
            try:
                flat[key] = float(value)
            except ValueError as e:
                raise ValueError(f"{where}: {key} must be a number, got {value!r}") from e
    merged = {**data, **flat}
    for key in ("prefix_index_capacity", "kvstore_blocks"):
        if key in merged:
            merged[key] = int(merged[key])
    return ClusterSpec(pools=pools, gpus=gpus, engine=engine, spot=spot, **merged)


def _build(cls: type, data: dict[str, Any], where: str):
    _check(data, {f.name for f in fields(cls)}, where)
    typed = {}
    for f in fields(cls):
        if f.name in data:
            kind = {"float": float, "int": int, "str": str}[f.type]
            value = kind(data[f.name])
            if kind is not str and not math.isfinite(value):
                raise ValueError(f"{where}.{f.name} must be finite, got {data[f.name]!r}")
            typed[f.name] = value
    return cls(**typed)


def _check(data: Any, allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")  # noqa: TRY004 (a config error)
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
