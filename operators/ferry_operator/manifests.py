"""The objects an InferenceCluster renders to, as plain dicts (pure; docs/kubernetes.md is the contract).

    <name>-config      ConfigMap: the FERRY_* settings every component reads (envFrom)
    <name>-scheduler   Deployment + Service (grpc 50050, metrics 9090)
    <name>-kvstore     Deployment + Service (grpc 50051, metrics 9090)      unless spec.kvstore.enabled=false
    <name>-gateway     Deployment + Service (http, grpc-sink 50070)
    <name>-prefill     Deployment + PodDisruptionBudget (maxUnavailable 1)
    <name>-decode      Deployment + PodDisruptionBudget (maxUnavailable 1)

Each object carries the cluster's labels, a controller ownerReference to the InferenceCluster and the
`serving.ferry.dev/spec-hash` annotation: a hash of the object as rendered, without that annotation and,
for the worker pools, without `spec.replicas` (the creation-time size: the operator scales pools itself).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

from operators.ferry_operator import podspec
from operators.ferry_operator.names import (
    API_VERSION,
    COMPONENT_LABEL,
    CONFIG_HASH,
    GATEWAY_HTTP_PORT,
    GATEWAY_SINK_PORT,
    KIND,
    KVSTORE_PORT,
    METRICS_PORT,
    POOLS,
    SCHEDULER_PORT,
    SPEC_HASH,
    WORKER_PORT,
    ClusterRef,
)
from operators.ferry_operator.spec import ClusterSpec

ObjectKey = tuple[str, str]     # (kind, name)
PDB_VERSIONS = ("policy/v1", "policy/v1beta1")


@dataclass(frozen=True, slots=True)
class RenderOptions:
    control_plane_image: str = "ghcr.io/ferry-serving/ferry:0.1.0"
    worker_image: str = "ghcr.io/ferry-serving/ferry-worker:0.1.0"
    bind_pod_ip: bool = False
    pdb_api_version: str = "policy/v1"     # discovered at startup: policy/v1beta1 on clusters before 1.21

    def __post_init__(self) -> None:
        if self.pdb_api_version not in PDB_VERSIONS:
            raise ValueError(f"pdb_api_version {self.pdb_api_version!r}: use one of {', '.join(PDB_VERSIONS)}")


def key_of(obj: dict) -> ObjectKey:
    return obj["kind"], obj["metadata"]["name"]


def is_pool_deployment(obj: dict) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return obj.get("kind") == "Deployment" and labels.get(COMPONENT_LABEL) in POOLS


def spec_hash(obj: dict) -> str:
    """Stable hash of what the operator renders (the annotation itself and a pool's replicas left out)."""
    view = copy.deepcopy(obj)
    meta = view.get("metadata", {})
    annotations = meta.pop("annotations", None) or {}
    annotations.pop(SPEC_HASH, None)
    if annotations:
        meta["annotations"] = annotations
    if is_pool_deployment(view):
        view.get("spec", {}).pop("replicas", None)
    text = json.dumps(view, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _stamped(obj: dict) -> dict:
    obj["metadata"].setdefault("annotations", {})[SPEC_HASH] = spec_hash(obj)
    return obj


def _meta(ref: ClusterRef, name: str, component: str | None) -> dict:
    owner = {"apiVersion": API_VERSION, "kind": KIND, "name": ref.name, "uid": ref.uid,
             "controller": True, "blockOwnerDeletion": True}
    return {"name": name, "namespace": ref.namespace, "labels": ref.labels(component), "ownerReferences": [owner]}


def config_data(ref: ClusterRef, spec: ClusterSpec) -> dict[str, str]:
    """The ConfigMap's FERRY_* settings, shared by every component (each reads only its own prefix)."""
    s, model = spec.scheduler, spec.model
    data = {
        "FERRY_SCHEDULER_PORT": SCHEDULER_PORT, "FERRY_SCHEDULER_METRICS_PORT": METRICS_PORT,
        "FERRY_SCHEDULER_REDIS_URL": s.redis_url, "FERRY_SCHEDULER_ROUTING_CONFIG": s.routing,
        "FERRY_SCHEDULER_MIGRATION_INTERVAL_S": s.migration_interval_s if s.migration_enabled else 0,
        "FERRY_KVSTORE_PORT": KVSTORE_PORT, "FERRY_KVSTORE_METRICS_PORT": METRICS_PORT,
        "FERRY_KVSTORE_CAPACITY_GB": spec.kvstore.capacity_gib,
        "FERRY_GATEWAY_PORT": GATEWAY_HTTP_PORT, "FERRY_GATEWAY_SINK_PORT": GATEWAY_SINK_PORT,
        "FERRY_GATEWAY_SCHEDULER_ADDRESS": ref.scheduler_address, "FERRY_GATEWAY_MODEL": model.path,
        "FERRY_WORKER_PORT": WORKER_PORT, "FERRY_WORKER_METRICS_PORT": METRICS_PORT,
        "FERRY_WORKER_SCHEDULER_ADDRESS": ref.scheduler_address,
        "FERRY_WORKER_KVSTORE_ADDRESS": ref.kvstore_address if spec.kvstore.enabled else "",
        "FERRY_WORKER_MODEL": model.path, "FERRY_WORKER_SERVED_MODEL_NAME": model.name,
        "FERRY_WORKER_ENGINE": model.engine, "FERRY_WORKER_SIM_PROFILE": model.sim_profile,
        "FERRY_WORKER_DEVICE": model.device, "FERRY_WORKER_DTYPE": model.dtype,
    }
    if s.migration_policies:
        data["FERRY_SCHEDULER_MIGRATION_POLICIES"] = ",".join(s.migration_policies)
    if spec.gateway.api_keys.is_enabled and s.redis_url:    # every gateway replica counts a key's limits once
        data["FERRY_GATEWAY_RATE_LIMIT_REDIS_URL"] = s.redis_url
    data.update(slo_data(spec))
    if s.autoscaling.enabled:
        data.update(autoscaling_data(ref, spec))
    return {k: str(v) for k, v in data.items()}


def slo_data(spec: ClusterSpec) -> dict:
    """The SLO, the same for the gateway (its attainment metrics) and the scheduler (the autoscaler), and
    the power budget the scheduler exports."""
    s = spec.scheduler
    return {"FERRY_GATEWAY_SLO_TTFT_MS": s.ttft_ms, "FERRY_GATEWAY_SLO_TPOT_MS": s.tpot_ms,
            "FERRY_SCHEDULER_SLO_TTFT_MS": s.ttft_ms, "FERRY_SCHEDULER_SLO_TPOT_MS": s.tpot_ms,
            "FERRY_SCHEDULER_POWER_BUDGET_WATTS": spec.power_budget_watts}


def autoscaling_data(ref: ClusterRef, spec: ClusterSpec) -> dict:
    """The scheduler's autoscaler settings: bounds are the pools' (the operator clamps again), the
    goodput model is the workers' sim profile, the counters come from Prometheus scoped to this cluster
    (the ServiceMonitor/PodMonitor labels) or from the gateway's /metrics."""
    a = spec.scheduler.autoscaling
    data = {"FERRY_SCHEDULER_AUTOSCALE_INTERVAL_S": a.interval_s, "FERRY_SCHEDULER_AUTOSCALE_WINDOW_S": a.window_s,
            "FERRY_SCHEDULER_AUTOSCALE_ATTAINMENT_TARGET": a.attainment_target,
            "FERRY_SCHEDULER_AUTOSCALE_HEADROOM": a.headroom,
            "FERRY_SCHEDULER_AUTOSCALE_SCALE_UP_AFTER_S": a.scale_up_after_s,
            "FERRY_SCHEDULER_AUTOSCALE_SCALE_DOWN_AFTER_S": a.scale_down_after_s,
            "FERRY_SCHEDULER_AUTOSCALE_PROFILE": spec.model.sim_profile,
            "FERRY_SCHEDULER_AUTOSCALE_MAX_NUM_SEQS": spec.decode.max_num_seqs}
    for pool in POOLS:
        bounds = spec.pool(pool)
        data[f"FERRY_SCHEDULER_AUTOSCALE_{pool.upper()}_REPLICAS"] = f"{bounds.min_replicas}:{bounds.max_replicas}"
    if a.prometheus_url:
        data["FERRY_SCHEDULER_PROMETHEUS_URL"] = a.prometheus_url
        data["FERRY_SCHEDULER_PROMETHEUS_SELECTOR"] = f'namespace="{ref.namespace}",ferry_cluster="{ref.name}"'
    else:
        data["FERRY_SCHEDULER_GATEWAY_METRICS_URLS"] = (f"http://{ref.object_name('gateway')}.{ref.namespace}.svc:"
                                                         f"{GATEWAY_HTTP_PORT}/metrics")
    return data


def config_map(ref: ClusterRef, spec: ClusterSpec) -> dict:
    return _stamped({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ref, ref.config_name, None),
                     "data": config_data(ref, spec)})


def _strategy(component: str) -> dict:
    if component in ("scheduler", "kvstore"):
        return {"type": "Recreate"}     # one scheduler (one registry), one kvstore (one cache) at a time
    if component in POOLS:              # no surge: a GPU worker needs a free GPU to surge onto
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def deployment(ref: ClusterRef, spec: ClusterSpec, component: str, options: RenderOptions, config_hash: str) -> dict:
    if component in POOLS:
        replicas = spec.pool(component).clamp(spec.pool(component).replicas)
        image = spec.images.worker or options.worker_image
    else:
        replicas = spec.gateway.replicas if component == "gateway" else 1
        image = spec.images.control_plane or options.control_plane_image
    template = {"metadata": {"labels": ref.labels(component), "annotations": {CONFIG_HASH: config_hash}},
                "spec": podspec.pod_spec(ref, spec, component, image, options.bind_pod_ip)}
    return _stamped({"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": _meta(ref, ref.object_name(component), component),
                     "spec": {"replicas": replicas, "revisionHistoryLimit": 3,
                              "selector": {"matchLabels": ref.selector(component)},
                              "strategy": _strategy(component), "template": template}})


def _service_ports(spec: ClusterSpec, component: str) -> list[dict]:
    if component == "gateway":
        named = (("http", spec.gateway.port, "http"), ("grpc-sink", GATEWAY_SINK_PORT, "grpc-sink"))
    else:
        grpc_port = SCHEDULER_PORT if component == "scheduler" else KVSTORE_PORT
        named = (("grpc", grpc_port, "grpc"), ("metrics", METRICS_PORT, "metrics"))
    return [{"name": name, "port": port, "targetPort": target, "protocol": "TCP"} for name, port, target in named]


def service(ref: ClusterRef, spec: ClusterSpec, component: str) -> dict:
    kind = spec.gateway.service_type if component == "gateway" else "ClusterIP"
    return _stamped({"apiVersion": "v1", "kind": "Service",
                     "metadata": _meta(ref, ref.object_name(component), component),
                     "spec": {"type": kind, "selector": ref.selector(component),
                              "ports": _service_ports(spec, component)}})


def disruption_budget(ref: ClusterRef, pool: str, api_version: str) -> dict:
    return _stamped({"apiVersion": api_version, "kind": "PodDisruptionBudget",
                     "metadata": _meta(ref, ref.object_name(pool), pool),
                     "spec": {"maxUnavailable": 1, "selector": {"matchLabels": ref.selector(pool)}}})


def render(ref: ClusterRef, spec: ClusterSpec, options: RenderOptions) -> tuple[dict, ...]:
    """Every object the cluster should have, in a good creation order (config, then servers, then pools)."""
    config = config_map(ref, spec)
    config_hash = config["metadata"]["annotations"][SPEC_HASH]
    objects = [config]
    for component in ("scheduler", "kvstore", "gateway"):
        if component == "kvstore" and not spec.kvstore.enabled:
            continue
        objects += [service(ref, spec, component), deployment(ref, spec, component, options, config_hash)]
    for pool in POOLS:
        objects += [deployment(ref, spec, pool, options, config_hash),
                    disruption_budget(ref, pool, options.pdb_api_version)]
    return tuple(objects)
