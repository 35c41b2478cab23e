"""The operator's reads and writes of the API server (blocking: handlers run these in a thread).

Writes are server-side apply with field manager `ferry-operator` and force: the operator owns what it
renders, a field it stops rendering is removed, and fields it never renders (added by others) stay.
Pools are scaled with a merge patch of spec.replicas, pods deleted one by one, status merge-patched
through the status subresource.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.discovery import LazyDiscoverer
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from operators.ferry_operator.manifests import ObjectKey
from operators.ferry_operator.names import (
    API_VERSION,
    COMPONENT_LABEL,
    KIND,
    MANAGER,
    POOLS,
    SPEC_HASH,
    WORKER_PODS_SELECTOR,
    ClusterRef,
)
from operators.ferry_operator.pool_plan import PodState
from operators.ferry_operator.reconcile import DeploymentState
from operators.ferry_operator.status import parse_time

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True, slots=True)
class ClusterObjects:
    """What exists of one cluster: our objects' spec-hashes, its Deployments and its pool pods."""
    existing: Mapping[ObjectKey, str]
    deployments: Mapping[str, DeploymentState]
    pods: Mapping[str, tuple[PodState, ...]]


def pod_state(pod: Mapping[str, Any]) -> PodState:
    """A pod (as a dict) → what the scale-down logic needs of it."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return PodState(name=meta["name"], phase=status.get("phase") or "Pending", is_ready=ready,
                    is_terminating=bool(meta.get("deletionTimestamp")),
                    created_at=parse_time(meta.get("creationTimestamp"), 0.0),
                    node_name=(pod.get("spec") or {}).get("nodeName") or "")


def deployment_state(dep: Mapping[str, Any]) -> DeploymentState:
    spec, status = dep.get("spec") or {}, dep.get("status") or {}
    return DeploymentState(replicas=int(spec.get("replicas", 1)), ready_replicas=int(status.get("readyReplicas") or 0))


class InMemoryDiscoverer(LazyDiscoverer):
    """API discovery kept for the process's life only. The stock one writes a cache file to the temp
    directory for every API server address (`/tmp/osrcp-<md5>.json`), left behind by every test run;
    a restarted operator discovers again with a few GETs, as client-go's controllers do."""

    def _write_cache(self) -> None:
        pass


class Kube:
    """A DynamicClient and the handful of calls the operator makes."""

    def __init__(self, api: client.ApiClient, pdb_api_version: str | None = None, timeout_s: float = 15.0) -> None:
        self.dyn = DynamicClient(api, discoverer=InMemoryDiscoverer)
        self.timeout = {"_request_timeout": timeout_s}     # every call: a hung connection must not stall a cluster
        self.pdb_api_version = pdb_api_version or self.discover_pdb_api_version()

    def discover_pdb_api_version(self) -> str:
        """policy/v1 where the server has it (1.21+), else policy/v1beta1."""
        versions = {r.group_version for r in self.dyn.resources.search(group="policy", kind="PodDisruptionBudget")}
        return "policy/v1" if "policy/v1" in versions or not versions else "policy/v1beta1"

    def _resource(self, api_version: str, kind: str):
        return self.dyn.resources.get(api_version=api_version, kind=kind)

    def _kinds(self) -> tuple[tuple[str, str], ...]:
        return (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
                (self.pdb_api_version, "PodDisruptionBudget"))

    def _list(self, api_version: str, kind: str, namespace: str | None, **selectors: str) -> list[dict]:
        found = self.dyn.get(self._resource(api_version, kind), namespace=namespace, **selectors, **self.timeout)
        return found.to_dict().get("items") or []

    def observe(self, ref: ClusterRef) -> ClusterObjects:
        existing: dict[ObjectKey, str] = {}
        deployments: dict[str, DeploymentState] = {}
        for api_version, kind in self._kinds():
            for obj in self._list(api_version, kind, ref.namespace, label_selector=ref.owned_selector):
                meta = obj["metadata"]
                existing[(kind, meta["name"])] = (meta.get("annotations") or {}).get(SPEC_HASH, "")
                component = (meta.get("labels") or {}).get(COMPONENT_LABEL)
                if kind == "Deployment" and component and meta["name"] == ref.object_name(component):
                    deployments[component] = deployment_state(obj)
        pods: dict[str, list[PodState]] = {pool: [] for pool in POOLS}
        for pod in self._list("v1", "Pod", ref.namespace, label_selector=f"{ref.owned_selector},"
                              f"{COMPONENT_LABEL} in ({','.join(POOLS)})"):
            pods[pod["metadata"]["labels"][COMPONENT_LABEL]].append(pod_state(pod))
        return ClusterObjects(existing=existing, deployments=deployments,
                              pods={pool: tuple(p) for pool, p in pods.items()})

    def get_cluster(self, ref: ClusterRef) -> dict | None:
        """The InferenceCluster as it is now (None: deleted). Read fresh on every reconcile: the drain
        records in its status must never be older than the last status this operator wrote."""
        try:
            return self.dyn.get(self._resource(API_VERSION, KIND), name=ref.name, namespace=ref.namespace,
                                **self.timeout).to_dict()
        except NotFoundError:
            return None

    def list_clusters(self, namespace: str | None) -> list[ClusterRef]:
        """Every InferenceCluster in `namespace` (None: all namespaces)."""
        items = self.dyn.get(self._resource(API_VERSION, KIND), namespace=namespace, **self.timeout).to_dict()["items"]
        return [ClusterRef.of(item) for item in items if not item["metadata"].get("deletionTimestamp")]

    def apply(self, obj: dict) -> None:
        self.dyn.server_side_apply(self._resource(obj["apiVersion"], obj["kind"]), body=obj,
                                   field_manager=MANAGER, force_conflicts=True, **self.timeout)

    def delete(self, namespace: str, key: ObjectKey) -> None:
        kind, name = key
        api_version = {k: v for v, k in self._kinds()}[kind]
        try:
            self.dyn.delete(self._resource(api_version, kind), name=name, namespace=namespace, **self.timeout)
        except NotFoundError:
            pass

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.dyn.delete(self._resource("v1", "Pod"), name=name, namespace=namespace, **self.timeout)
        except NotFoundError:
            pass

    def scale(self, ref: ClusterRef, pool: str, replicas: int) -> None:
        self.dyn.patch(self._resource("apps/v1", "Deployment"), name=ref.object_name(pool), namespace=ref.namespace,
                       body={"spec": {"replicas": replicas}}, content_type=MERGE_PATCH, **self.timeout)

    def patch_status(self, ref: ClusterRef, patch: Mapping[str, Any]) -> None:
        resource = self._resource(API_VERSION, KIND)
        self.dyn.patch(resource.status, name=ref.name, namespace=ref.namespace, body={"status": dict(patch)},
                       content_type=MERGE_PATCH, **self.timeout)

    def worker_pods_on_node(self, node: str, namespace: str | None) -> list[dict]:
        """Ferry worker pods bound to `node` (every namespace when `namespace` is None)."""
        return self._list("v1", "Pod", namespace, label_selector=WORKER_PODS_SELECTOR,
                          field_selector=f"spec.nodeName={node}")


__all__ = ["ClusterObjects", "Kube", "NotFoundError", "ResourceNotFoundError", "deployment_state", "pod_state"]
