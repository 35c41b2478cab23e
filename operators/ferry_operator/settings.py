"""The operator's own settings (FERRY_OPERATOR_<FIELD> env vars, or flags of `python -m operators.ferry_operator`).

The chart sets namespace, the two images, bind_pod_ip and health_port; the rest are tuning knobs.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import parse_settings, setting

ENV_PREFIX = "FERRY_OPERATOR_"
PROG = "python -m operators.ferry_operator"


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    namespace: str = setting("", "namespace whose InferenceClusters to serve ('' = every namespace)")
    control_plane_image: str = setting("ghcr.io/ferry-serving/ferry:0.1.0",
                                       "gateway/scheduler/kvstore image when spec.images.controlPlane is unset")
    worker_image: str = setting("ghcr.io/ferry-serving/ferry-worker:0.1.0",
                                "prefill/decode image when spec.images.worker is unset")
    bind_pod_ip: bool = setting(False, "services listen on $(POD_IP) instead of 0.0.0.0 (pods sharing one "
                                "network namespace, e.g. the e2e test kubelet); the health endpoint too")
    scheduler_address: str = setting("{name}-scheduler.{namespace}.svc:50050",
                                     "how the operator reaches a cluster's scheduler ({name}, {namespace})")
    resync_seconds: float = setting(2.0, "reconcile a settled InferenceCluster this often")
    drain_poll_seconds: float = setting(1.0, "reconcile this often while a cluster converges (drains, scaling)")
    grpc_timeout_seconds: float = setting(3.0, "deadline of each call to a scheduler")
    health_port: int = setting(8080, "port of the liveness endpoint GET /healthz (-1: off)")
    watch_nodes: bool = setting(True, "watch Nodes for spot-termination taints (needs nodes list/watch "
                                "cluster-wide; off: only the workers' own metadata polling sees notices)")

    def __post_init__(self) -> None:
        if self.resync_seconds <= 0 or self.drain_poll_seconds <= 0:
            raise ValueError("resync_seconds and drain_poll_seconds must be > 0")
        if self.grpc_timeout_seconds <= 0:
            raise ValueError(f"grpc_timeout_seconds {self.grpc_timeout_seconds}: use a positive number")
        if not -1 <= self.health_port <= 65535:
            raise ValueError(f"health_port {self.health_port}: use -1 (off) or a port")
        try:
            self.scheduler_address.format(name="n", namespace="ns")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"scheduler_address {self.scheduler_address!r}: only {{name}} and {{namespace}} "
                             f"may appear in it ({e})") from None

    @property
    def tick_seconds(self) -> float:
        """How often the per-cluster timer fires; a settled cluster is only reconciled every resync_seconds."""
        return min(self.resync_seconds, self.drain_poll_seconds)

    def scheduler_address_of(self, name: str, namespace: str) -> str:
        return self.scheduler_address.format(name=name, namespace=namespace)


def load_settings(argv: list[str] | None = None) -> OperatorSettings:
    """Flags > FERRY_OPERATOR_* env > defaults. `argv=None` reads no flags (the env only)."""
    return parse_settings(OperatorSettings, argv or [], prog=PROG,
                          description="The Ferry operator (kopf).", env_prefix=ENV_PREFIX)
