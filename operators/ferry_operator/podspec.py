"""Pod templates of the five components: containers, env, probes, volumes, security (pure).

Every container runs the `ferry` CLI (`ferry serve <component>`) with its settings in FERRY_* env:
the shared ones from the cluster's ConfigMap (envFrom), the per-pod ones (listen address, instance
id, advertised addresses, which reference the downward-API POD_IP/POD_NAME) and the per-pool ones in
`env`. Pods run as uid 10001 on a read-only root filesystem with an emptyDir at /tmp. With
spec.serviceAuth the service token Secret is mounted read-only in every pod (FERRY_SERVICE_TOKEN_FILE);
with spec.serviceTLS its CA and certificate likewise (FERRY_TLS_DIR: mutual TLS); with spec.gateway.apiKeys
the API keys Secret in the gateway's (--api-keys-file).
"""
from __future__ import annotations

from typing import Any

from operators.ferry_operator.names import (
    GATEWAY_HTTP_PORT,
    GATEWAY_SINK_PORT,
    KVSTORE_PORT,
    METRICS_PORT,
    SCHEDULER_PORT,
    WORKER_PORT,
    ClusterRef,
)
from operators.ferry_operator.spec import ClusterSpec, PoolSpec, SecretFileSpec
from services.common import service_tls

UID = 10001
DOWNWARD_ENV = (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                ("POD_IP", "status.podIP"), ("NODE_NAME", "spec.nodeName"))
# The taints clouds put on spot/preemptible nodes, tolerated by pools with `spot: true`.
SPOT_TOLERATIONS = (
    {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    {"key": "cloud.google.com/gke-preemptible", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot", "effect": "NoSchedule"},
)
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
# Secrets mounted read-only as files. The service token goes to every Ferry process (they read the env
# var, services/common/service_auth.py); the API keys file only to the gateway (its --api-keys-file).
SERVICE_TOKEN_DIR, SERVICE_TOKEN_FILE = "/etc/ferry/service-token", "token"
API_KEYS_DIR, API_KEYS_FILE = "/etc/ferry/api-keys", "api-keys.yaml"
SERVICE_TLS_DIR = "/etc/ferry/tls"                                  # holds service_tls.FILES
SECRET_FILE_MODE = 0o440            # owner and fsGroup read; nobody writes
SETTINGS_PREFIX = {"scheduler": "FERRY_SCHEDULER_", "kvstore": "FERRY_KVSTORE_", "gateway": "FERRY_GATEWAY_",
                   "prefill": "FERRY_WORKER_", "decode": "FERRY_WORKER_"}


def _value(name: str, value: Any) -> dict:
    return {"name": name, "value": str(value)}


def base_env(component: str, bind_pod_ip: bool) -> list[dict]:
    """Downward-API env, HOME on the writable /tmp, and the listen address."""
    env = [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}} for name, path in DOWNWARD_ENV]
    return env + [_value("HOME", "/tmp"),
                  _value(SETTINGS_PREFIX[component] + "HOST", "$(POD_IP)" if bind_pod_ip else "0.0.0.0")]


def _tcp_probes(port: str) -> dict:
    return {"readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 5, "failureThreshold": 3},
            "livenessProbe": {"tcpSocket": {"port": port}, "initialDelaySeconds": 10, "periodSeconds": 10,
                              "failureThreshold": 6}}


def _http_probes(ready_path: str, live_path: str, port: str) -> dict:
    return {"readinessProbe": {"httpGet": {"path": ready_path, "port": port}, "periodSeconds": 5,
                               "failureThreshold": 3},
            "livenessProbe": {"httpGet": {"path": live_path, "port": port}, "initialDelaySeconds": 10,
                              "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6}}


def _ports(*named: tuple[str, int]) -> list[dict]:
    return [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in named]


def _pool_env(pool: PoolSpec) -> list[dict]:
    env = [_value("FERRY_WORKER_INSTANCE_ID", "$(POD_NAME)"),
           _value("FERRY_WORKER_ADVERTISE_ADDRESS", f"$(POD_IP):{WORKER_PORT}"),
           _value("FERRY_WORKER_GPU_MEMORY_UTILIZATION", pool.gpu_memory_utilization),
           _value("FERRY_WORKER_MAX_NUM_SEQS", pool.max_num_seqs)]
    if pool.kv_cache_memory_gib is not None:
        env.append(_value("FERRY_WORKER_KV_CACHE_MEMORY_GB", pool.kv_cache_memory_gib))
    return env + [dict(e) for e in pool.env]    # the user's env last: it overrides ours


def container(ref: ClusterRef, spec: ClusterSpec, component: str, image: str, bind_pod_ip: bool) -> dict:
    """The one container of `component`'s pods."""
    env = base_env(component, bind_pod_ip)
    if component == "scheduler":
        extra = {"ports": _ports(("grpc", SCHEDULER_PORT), ("metrics", METRICS_PORT)), **_tcp_probes("grpc")}
        resources = spec.scheduler.resources
    elif component == "kvstore":
        extra = {"ports": _ports(("grpc", KVSTORE_PORT), ("metrics", METRICS_PORT)), **_tcp_probes("grpc")}
        resources = spec.kvstore.resources
    elif component == "gateway":
        env.append(_value("FERRY_GATEWAY_SINK_ADVERTISE_ADDRESS", f"$(POD_IP):{GATEWAY_SINK_PORT}"))
        extra = {"ports": _ports(("http", GATEWAY_HTTP_PORT), ("grpc-sink", GATEWAY_SINK_PORT)),
                 **_http_probes("/health", "/health", "http")}
        resources = spec.gateway.resources
    else:
        pool = spec.pool(component)
        env += _pool_env(pool)
        extra = {"ports": _ports(("grpc", WORKER_PORT), ("metrics", METRICS_PORT)),
                 **_http_probes("/readyz", "/healthz", "metrics")}
        resources = pool.resources
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    if spec.model.volume and component in ("gateway", "prefill", "decode"):
        mounts.append({"name": "model", "mountPath": spec.model.mount_path, "readOnly": True})
    command = ["ferry", "serve", component]
    if spec.service_auth.is_enabled:
        env.append(_value("FERRY_SERVICE_TOKEN_FILE", f"{SERVICE_TOKEN_DIR}/{SERVICE_TOKEN_FILE}"))
        mounts.append({"name": "service-token", "mountPath": SERVICE_TOKEN_DIR, "readOnly": True})
    if spec.service_tls_secret:
        env.append(_value("FERRY_TLS_DIR", SERVICE_TLS_DIR))
        mounts.append({"name": "service-tls", "mountPath": SERVICE_TLS_DIR, "readOnly": True})
    if component == "gateway" and spec.gateway.api_keys.is_enabled:
        command += ["--api-keys-file", f"{API_KEYS_DIR}/{API_KEYS_FILE}"]
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    return {"name": component, "image": image, "imagePullPolicy": spec.images.pull_policy,
            "command": command, "envFrom": [{"configMapRef": {"name": ref.config_name}}],
            "env": env, **extra, "resources": dict(resources or {}), "securityContext": dict(CONTAINER_SECURITY),
            "volumeMounts": mounts}


def _secret_volume(name: str, source: SecretFileSpec, file_name: str) -> dict:
    """One key of a Secret as `file_name` (a projected key, not subPath: a rotated Secret reaches the pod)."""
    return {"name": name, "secret": {"secretName": source.secret_name, "defaultMode": SECRET_FILE_MODE,
                                     "items": [{"key": source.secret_key, "path": file_name}]}}


def pod_spec(ref: ClusterRef, spec: ClusterSpec, component: str, image: str, bind_pod_ip: bool) -> dict:
    volumes: list[dict] = [{"name": "tmp", "emptyDir": {}}]
    if spec.model.volume and component in ("gateway", "prefill", "decode"):
        volumes.append({"name": "model", **spec.model.volume})
    if spec.service_auth.is_enabled:
        volumes.append(_secret_volume("service-token", spec.service_auth, SERVICE_TOKEN_FILE))
    if spec.service_tls_secret:
        volumes.append({"name": "service-tls", "secret": {
            "secretName": spec.service_tls_secret, "defaultMode": SECRET_FILE_MODE,
            "items": [{"key": name, "path": name} for name in service_tls.FILES]}})
    if component == "gateway" and spec.gateway.api_keys.is_enabled:
        volumes.append(_secret_volume("api-keys", spec.gateway.api_keys, API_KEYS_FILE))
    out: dict[str, Any] = {
        "containers": [container(ref, spec, component, image, bind_pod_ip)], "volumes": volumes,
        "securityContext": dict(POD_SECURITY), "enableServiceLinks": False,   # no FERRY_*_PORT=tcp://… clashes
        "automountServiceAccountToken": False}
    if spec.images.pull_secrets:
        out["imagePullSecrets"] = [{"name": s} for s in spec.images.pull_secrets]
    if component in ("prefill", "decode"):
        pool = spec.pool(component)
        tolerations = [dict(t) for t in pool.tolerations]
        if pool.is_spot:
            tolerations += [dict(t) for t in SPOT_TOLERATIONS if t not in tolerations]
        if tolerations:
            out["tolerations"] = tolerations
        if pool.node_selector:
            out["nodeSelector"] = dict(pool.node_selector)
    return out
