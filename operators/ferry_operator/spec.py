"""An InferenceCluster's spec as frozen dataclasses, with the CRD's defaults applied and validated.

The API server applies the CRD's defaults and bounds already; this module applies them again so the
operator is correct on its own (an older CRD, a unit test's dict), and checks what the schema cannot
(minReplicas <= maxReplicas). Errors are ValueErrors whose message names the field and the fix.
Mappings that Kubernetes owns the shape of (resources, volume, tolerations, env) are passed through.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

POOLS = ("prefill", "decode")
ENGINES = ("llm", "sim")
DEVICES = ("cuda", "cpu")
DTYPES = ("float32", "bfloat16", "float16")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
MIGRATION_POLICIES = ("drain", "priority", "defragmentation", "load_balance")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    path: str = "/models/model"
    volume: Mapping[str, Any] | None = None
    mount_path: str = "/models"
    engine: str = "llm"
    sim_profile: str = "llama3-8b-h100"
    dtype: str = "bfloat16"
    device: str = "cuda"


@dataclass(frozen=True, slots=True)
class ImagesSpec:
    control_plane: str = ""          # "" = the operator's default (settings)
    worker: str = ""
    pull_policy: str = "IfNotPresent"
    pull_secrets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SecretFileSpec:
    """One key of a Secret that pods read as a file (mounted read-only); no secret_name = not used."""
    secret_name: str = ""
    secret_key: str = ""

    @property
    def is_enabled(self) -> bool:
        return bool(self.secret_name)


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    replicas: int = 1
    port: int = 8000
    service_type: str = "ClusterIP"
    resources: Mapping[str, Any] | None = None
    api_keys: SecretFileSpec = SecretFileSpec(secret_key="api-keys.yaml")   # the gateway's --api-keys-file


@dataclass(frozen=True, slots=True)
class AutoscalingSpec:
    """spec.scheduler.autoscaling: the scheduler recommends pool sizes within each pool's min/maxReplicas."""
    enabled: bool = False
    interval_s: float = 15.0
    window_s: float = 60.0
    prometheus_url: str = ""          # "" = the scheduler scrapes the gateway itself
    attainment_target: float = 0.95
    headroom: float = 1.2
    scale_up_after_s: float = 30.0
    scale_down_after_s: float = 300.0


@dataclass(frozen=True, slots=True)
class SchedulerSpec:
    routing: str = "ferry"
    migration_enabled: bool = True
    migration_interval_s: float = 0.5
    migration_policies: tuple[str, ...] = ()     # () = the scheduler's default set
    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0
    redis_url: str = ""
    resources: Mapping[str, Any] | None = None
    autoscaling: AutoscalingSpec = AutoscalingSpec()


@dataclass(frozen=True, slots=True)
class KVStoreSpec:
    enabled: bool = True
    capacity_gib: float = 4.0
    resources: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PoolSpec:
    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 16
    resources: Mapping[str, Any] | None = None
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, Any], ...] = ()
    is_spot: bool = False
    kv_cache_memory_gib: float | None = None
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 64
    env: tuple[Mapping[str, Any], ...] = ()

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    model: ModelSpec
    images: ImagesSpec = ImagesSpec()
    gateway: GatewaySpec = GatewaySpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    kvstore: KVStoreSpec = KVStoreSpec()
    prefill: PoolSpec = PoolSpec()
    decode: PoolSpec = PoolSpec()
    drain_timeout_s: int = 300
    power_budget_watts: float = 0.0
    service_auth: SecretFileSpec = SecretFileSpec(secret_key="token")     # the shared gRPC token (off: no secret)
    service_tls_secret: str = ""      # a Secret of ca.crt, tls.crt, tls.key: mutual TLS between pods ("": off)

    def pool(self, name: str) -> PoolSpec:
        if name not in POOLS:
            raise KeyError(f"no pool {name!r}: pools are {', '.join(POOLS)}")
        return self.prefill if name == "prefill" else self.decode


class _Fields:
    """Typed reads of one object of the spec; every error names the field's full path."""

    def __init__(self, data: Any, path: str):
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path} must be an object, got {type(data).__name__}")  # noqa: TRY004 (spec errors are ValueError)
        self.data, self.path = data, path

    def _fail(self, key: str, what: str) -> ValueError:
        return ValueError(f"{self.path}.{key}: {what} (got {self.data.get(key)!r})")

    def obj(self, key: str) -> _Fields:
        return _Fields(self.data.get(key), f"{self.path}.{key}")

    def text(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self.data.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, str):
            raise self._fail(key, "must be a string")
        if choices and value not in choices:
            raise self._fail(key, f"use one of {', '.join(choices)}")
        return value

    def number(self, key: str, default: float | None, low: float | None = None, high: float | None = None,
               integer: bool = False) -> Any:
        value = self.data.get(key, default)
        if value is None:
            return None
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self._fail(key, "must be an integer" if integer else "must be a number")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self._fail(key, f"must be within [{low if low is not None else '-inf'}, "
                                  f"{high if high is not None else 'inf'}]")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "must be true or false")
        return value

    def mapping(self, key: str) -> Mapping[str, Any] | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise self._fail(key, "must be an object")
        return dict(value) if value else None

    def items(self, key: str) -> tuple[Any, ...]:
        value = self.data.get(key) or []
        if not isinstance(value, list):
            raise self._fail(key, "must be a list")
        return tuple(value)


def _secret_name(f: _Fields) -> str:
    name = f.text("secretName", "")
    if name and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
        raise ValueError(f"{f.path}.secretName {name!r}: name a Secret (a DNS subdomain: lowercase, digits, '-', '.')")
    return name


def _secret_file(f: _Fields, default_key: str) -> SecretFileSpec:
    name, key = _secret_name(f), f.text("secretKey", default_key) or default_key
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", key):
        raise ValueError(f"{f.path}.secretKey {key!r}: a Secret key is letters, digits, '-', '_' and '.'")
    return SecretFileSpec(secret_name=name, secret_key=key)


def _model(f: _Fields) -> ModelSpec:
    name = f.text("name", "")
    if not name:
        raise ValueError(f"{f.path}.name is required: the served model name (the OpenAI API's `model`)")
    return ModelSpec(name=name, path=f.text("path", "/models/model"), volume=f.mapping("volume"),
                     mount_path=f.text("mountPath", "/models"), engine=f.text("engine", "llm", ENGINES),
                     sim_profile=f.text("simProfile", "llama3-8b-h100"), dtype=f.text("dtype", "bfloat16", DTYPES),
                     device=f.text("device", "cuda", DEVICES))


def _images(f: _Fields) -> ImagesSpec:
    secrets = f.items("pullSecrets")
    if not all(isinstance(s, str) and s for s in secrets):
        raise ValueError(f"{f.path}.pullSecrets must list Secret names (strings)")
    return ImagesSpec(control_plane=f.text("controlPlane", ""), worker=f.text("worker", ""),
                      pull_policy=f.text("pullPolicy", "IfNotPresent", PULL_POLICIES), pull_secrets=secrets)


def _scheduler(f: _Fields) -> SchedulerSpec:
    migration, slo = f.obj("migration"), f.obj("slo")
    policies = migration.items("policies")
    unknown = [p for p in policies if p not in MIGRATION_POLICIES]
    if unknown:
        raise ValueError(f"{migration.path}.policies: unknown {unknown}; use some of {', '.join(MIGRATION_POLICIES)}")
    if policies and "drain" not in policies:
        raise ValueError(f"{migration.path}.policies must include drain: scale-down and spot notices drain "
                         "workers through it (or leave policies out for the scheduler's default set)")
    return SchedulerSpec(routing=f.text("routing", "ferry"), migration_enabled=migration.flag("enabled", True),
                         migration_interval_s=migration.number("intervalSeconds", 0.5, low=0.05),
                         migration_policies=policies, ttft_ms=slo.number("ttftMilliseconds", 2000.0, low=1),
                         tpot_ms=slo.number("tpotMilliseconds", 100.0, low=1), redis_url=f.text("redisURL", ""),
                         resources=f.mapping("resources"), autoscaling=_autoscaling(f.obj("autoscaling")))


def _autoscaling(f: _Fields) -> AutoscalingSpec:
    spec = AutoscalingSpec(
        enabled=f.flag("enabled", False), interval_s=f.number("intervalSeconds", 15.0, low=1),
        window_s=f.number("windowSeconds", 60.0, low=1), prometheus_url=f.text("prometheusURL", ""),
        attainment_target=f.number("sloAttainmentTarget", 0.95, low=0.01, high=1),
        headroom=f.number("headroom", 1.2, low=1), scale_up_after_s=f.number("scaleUpAfterSeconds", 30.0, low=0),
        scale_down_after_s=f.number("scaleDownAfterSeconds", 300.0, low=0))
    if spec.window_s < spec.interval_s:
        raise ValueError(f"{f.path}.windowSeconds {spec.window_s} must cover at least one intervalSeconds "
                         f"({spec.interval_s})")
    if spec.prometheus_url and not spec.prometheus_url.startswith(("http://", "https://")):
        raise ValueError(f"{f.path}.prometheusURL {spec.prometheus_url!r} must start with http:// or https://")
    return spec


def _pool(f: _Fields) -> PoolSpec:
    pool = PoolSpec(
        replicas=f.number("replicas", 1, low=0, integer=True),
        min_replicas=f.number("minReplicas", 0, low=0, integer=True),
        max_replicas=f.number("maxReplicas", 16, low=0, integer=True),
        resources=f.mapping("resources"), node_selector=f.mapping("nodeSelector"),
        tolerations=f.items("tolerations"), is_spot=f.flag("spot", False),
        kv_cache_memory_gib=f.number("kvCacheMemoryGiB", None, low=0.01),
        gpu_memory_utilization=f.number("gpuMemoryUtilization", 0.85, low=0.05, high=1),
        max_num_seqs=f.number("maxNumSeqs", 64, low=1, integer=True), env=f.items("env"))
    if pool.min_replicas > pool.max_replicas:
        raise ValueError(f"{f.path}: minReplicas {pool.min_replicas} > maxReplicas {pool.max_replicas}: "
                         "lower minReplicas or raise maxReplicas")
    if not all(isinstance(t, Mapping) for t in pool.tolerations):
        raise ValueError(f"{f.path}.tolerations must list Toleration objects")
    if not all(isinstance(e, Mapping) and e.get("name") for e in pool.env):
        raise ValueError(f"{f.path}.env must list EnvVar objects, each with a name")
    return pool


def parse_spec(spec: Mapping[str, Any] | None) -> ClusterSpec:
    """The InferenceCluster's `spec` → ClusterSpec. Raises ValueError saying what to fix."""
    f = _Fields(spec, "spec")
    if not f.data.get("model"):
        raise ValueError("spec.model is required: at least {name: <served model name>}")
    gateway, kvstore, pools = f.obj("gateway"), f.obj("kvstore"), f.obj("pools")
    cluster = _cluster(f, gateway, kvstore, pools)
    autoscaling = cluster.scheduler.autoscaling
    if autoscaling.enabled and not autoscaling.prometheus_url and cluster.gateway.replicas > 1:
        raise ValueError("spec.scheduler.autoscaling: with gateway.replicas > 1 set prometheusURL (the scheduler's "
                         "built-in scraper reads one gateway through its Service, not each replica)")
    return cluster


def _cluster(f: _Fields, gateway: _Fields, kvstore: _Fields, pools: _Fields) -> ClusterSpec:
    return ClusterSpec(
        model=_model(f.obj("model")), images=_images(f.obj("images")),
        gateway=GatewaySpec(replicas=gateway.number("replicas", 1, low=1, integer=True),
                            port=gateway.number("port", 8000, low=1, high=65535, integer=True),
                            service_type=gateway.text("serviceType", "ClusterIP", SERVICE_TYPES),
                            resources=gateway.mapping("resources"),
                            api_keys=_secret_file(gateway.obj("apiKeys"), "api-keys.yaml")),
        scheduler=_scheduler(f.obj("scheduler")),
        kvstore=KVStoreSpec(enabled=kvstore.flag("enabled", True),
                            capacity_gib=kvstore.number("capacityGiB", 4.0, low=0.01),
                            resources=kvstore.mapping("resources")),
        prefill=_pool(pools.obj("prefill")), decode=_pool(pools.obj("decode")),
        drain_timeout_s=f.obj("drain").number("timeoutSeconds", 300, low=1, integer=True),
        power_budget_watts=f.obj("power").number("budgetWatts", 0.0, low=0) or 0.0,
        service_auth=_secret_file(f.obj("serviceAuth"), "token"),
        service_tls_secret=_secret_name(f.obj("serviceTLS")))
