"""Names, labels and ports of everything an InferenceCluster renders (docs/kubernetes.md)."""
from __future__ import annotations

from dataclasses import dataclass

GROUP, VERSION, PLURAL, KIND = "serving.ferry.dev", "v1alpha1", "inferenceclusters", "InferenceCluster"
API_VERSION = f"{GROUP}/{VERSION}"
MANAGER = "ferry-operator"                     # app.kubernetes.io/managed-by, and the SSA field manager
CLUSTER_LABEL = "serving.ferry.dev/cluster"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SPEC_HASH = "serving.ferry.dev/spec-hash"
CONFIG_HASH = "serving.ferry.dev/config-hash"  # on pod templates: a ConfigMap change rolls the pods

CONTROL_PLANE = ("scheduler", "kvstore", "gateway")
POOLS = ("prefill", "decode")
COMPONENTS = CONTROL_PLANE + POOLS

SCHEDULER_PORT, KVSTORE_PORT, WORKER_PORT = 50050, 50051, 50060
GATEWAY_HTTP_PORT, GATEWAY_SINK_PORT, METRICS_PORT = 8000, 50070, 9090


@dataclass(frozen=True, slots=True)
class ClusterRef:
    """The InferenceCluster object itself: what names, owner references and addresses derive from."""
    name: str
    namespace: str
    uid: str = ""

    @classmethod
    def of(cls, body: dict) -> ClusterRef:
        meta = body.get("metadata") or {}
        return cls(name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""))

    def object_name(self, component: str) -> str:
        return f"{self.name}-{component}"

    @property
    def config_name(self) -> str:
        return f"{self.name}-config"

    @property
    def scheduler_address(self) -> str:
        """The scheduler as pods reach it (cluster DNS)."""
        return f"{self.name}-scheduler.{self.namespace}.svc:{SCHEDULER_PORT}"

    @property
    def kvstore_address(self) -> str:
        return f"{self.name}-kvstore.{self.namespace}.svc:{KVSTORE_PORT}"

    def labels(self, component: str | None = None) -> dict[str, str]:
        out = {"app.kubernetes.io/name": "ferry", "app.kubernetes.io/instance": self.name,
               "app.kubernetes.io/part-of": "ferry", MANAGED_BY_LABEL: MANAGER, CLUSTER_LABEL: self.name}
        if component:
            out[COMPONENT_LABEL] = component
        return out

    def selector(self, component: str) -> dict[str, str]:
        return {CLUSTER_LABEL: self.name, COMPONENT_LABEL: component}

    @property
    def owned_selector(self) -> str:
        """Label selector of every object this cluster owns (for listing them)."""
        return f"{CLUSTER_LABEL}={self.name},{MANAGED_BY_LABEL}={MANAGER}"

    def pool_selector(self, pool: str) -> str:
        return f"{CLUSTER_LABEL}={self.name},{COMPONENT_LABEL}={pool}"


WORKER_PODS_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGER},{COMPONENT_LABEL} in (prefill,decode)"
