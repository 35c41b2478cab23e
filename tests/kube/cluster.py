"""The `kube_cluster` the operator and e2e tests run on: a real cluster when KUBECONFIG points at one
(kind in users' CI: `make e2e-kind`), else a local control plane (controlplane.py) with the test
kubelet (kubelet.py). Tests only use this interface, so they run unchanged on both.

    cluster.kubectl("get", "pods", "-n", ns)        cluster.helm("install", ...)
    cluster.create_namespace("e2e")                  (deleted at session end)
    with cluster.service_address(ns, "x-gateway", 8000) as addr: ...   # host:port reachable from here
    cluster.helm_values()                            # what the platform needs from the chart
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kubernetes import client, config

from tests.kube.controlplane import ROOT, ControlPlane, toolchain_bin
from tests.kube.kubelet import TestKubelet


class Cluster:
    def __init__(self, kubeconfig: Path, bin_dir: Path, *, plane: ControlPlane | None = None,
                 kubelet: TestKubelet | None = None):
        self.kubeconfig, self.bin_dir, self.plane, self.kubelet = kubeconfig, bin_dir, plane, kubelet
        self.namespaces: list[str] = []

    @property
    def is_local(self) -> bool:
        return self.plane is not None

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(str(self.kubeconfig))

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def _run(self, tool: str, args: tuple[str, ...], input: str | None, check: bool, timeout: float):
        proc = subprocess.run([str(self.bin_dir / tool), *args], check=False, input=input, text=True, capture_output=True,
                              env=self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120):
        return self._run("kubectl", args, input, check, timeout)

    def helm(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300):
        return self._run("helm", args, input, check, timeout)

    def create_namespace(self, prefix: str) -> str:
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.kubectl("create", "namespace", name)
        self.namespaces.append(name)
        return name

    def gpu_nodes(self) -> list[str]:
        if self.kubelet is not None:
            return list(self.kubelet.node_names)
        nodes = client.CoreV1Api(self.api_client()).list_node().items
        return [n.metadata.name for n in nodes if not (n.spec.taints or [])] or [n.metadata.name for n in nodes]

    def helm_values(self) -> dict:
        """Chart values this platform needs. Local: pods share one network namespace (listen on the pod
        IP) and the model folder is this checkout's. kind: the model folder is mounted into the nodes at
        the same path (`make e2e-kind` does it) and the images are loaded with `kind load`."""
        model_dir = ROOT / "models"
        return {"operator": {"bindPodIP": self.is_local},
                "redis": {"bindPodIP": self.is_local},
                "cluster": {"model": {"mountPath": str(model_dir), "volume": {"hostPath": {"path": str(model_dir)}}}}}

    @contextlib.contextmanager
    def service_address(self, namespace: str, service: str, port: int) -> Iterator[str]:
        """host:port of a Service's port, reachable from the test process."""
        if self.is_local:
            yield self._local_endpoint(namespace, service, port)
            return
        proc = subprocess.Popen([str(self.bin_dir / "kubectl"), "port-forward", "-n", namespace, f"svc/{service}",
                                 f":{port}"], env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = proc.stdout.readline()
            m = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not m:
                raise AssertionError(f"kubectl port-forward said: {line}")
            yield f"127.0.0.1:{m.group(1)}"
        finally:
            proc.terminate()
            proc.wait(10)

    def _local_endpoint(self, namespace: str, service: str, port: int, timeout: float = 60) -> str:
        core = client.CoreV1Api(self.api_client())
        svc = core.read_namespaced_service(service, namespace)
        target = next(p.target_port for p in svc.spec.ports if p.port == port)
        selector = ",".join(f"{k}={v}" for k, v in svc.spec.selector.items())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
                ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
                if ready and pod.metadata.deletion_timestamp is None:
                    number = target if isinstance(target, int) or str(target).isdigit() else next(
                        p.container_port for c in pod.spec.containers for p in c.ports or [] if p.name == target)
                    return f"{pod.status.pod_ip}:{number}"
            time.sleep(0.5)
        raise AssertionError(f"service {namespace}/{service} has no ready pod after {timeout} s")

    def close(self) -> None:
        for ns in self.namespaces:
            self.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.plane is not None:
            self.plane.stop()


def _external_kubeconfig() -> Path | None:
    path = os.environ.get("KUBECONFIG")
    return Path(path) if path and Path(path).is_file() else None


def start_cluster() -> Cluster:
    bin_dir = Path(os.environ["FERRY_K8S_BIN"]) if os.environ.get("FERRY_K8S_BIN") else toolchain_bin()
    external = _external_kubeconfig()
    if external is not None:
        return Cluster(external, bin_dir)
    plane = ControlPlane(bin_dir).start()
    try:
        api = config.new_client_from_config(str(plane.kubeconfig))
        kubelet = TestKubelet(api, plane.apiserver_port, plane.ca_file,
                              Path(tempfile.mkdtemp(prefix="ferry-kubelet-")), plane.service_ip).start()
    except BaseException:
        plane.stop()
        raise
    return Cluster(plane.kubeconfig, bin_dir, plane=plane, kubelet=kubelet)
