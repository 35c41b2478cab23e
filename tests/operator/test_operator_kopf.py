"""The operator under kopf against a real API server (`kube_cluster`), in-process (kopf.testing.KopfRunner,
as `kopf run --standalone -n NS`):

  * an InferenceCluster becomes its ConfigMap, Deployments, Services and PodDisruptionBudgets, owned by
    it, with status; a larger pool scales its Deployment;
  * (local control plane only: its pod IPs are reachable from here) with the real scheduler and sim
    workers running in the test kubelet: a smaller pool drains and deletes a decode pod, and a
    spot-termination taint on a node makes the scheduler drain that node's workers.
"""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from kopf.testing import KopfRunner

from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.procs import eventually

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "helm" / "ferry" / "crds" / "inferenceclusters.serving.ferry.dev.yaml"
NAME = "demo"
SMALL = {"resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}}


def inference_cluster(namespace: str) -> dict:
    """A sim-engine cluster on CPU (no weights): light enough for the test kubelet's processes."""
    model = ROOT / "models" / "SmolLM2-135M-Instruct"
    return {"apiVersion": "serving.ferry.dev/v1alpha1", "kind": "InferenceCluster",
            "metadata": {"name": NAME, "namespace": namespace},
            "spec": {"model": {"name": "smol", "path": str(model), "engine": "sim", "device": "cpu",
                               "dtype": "float32"},
                     "gateway": SMALL, "scheduler": SMALL, "kvstore": {**SMALL, "capacityGiB": 0.05},
                     "pools": {"prefill": {**SMALL, "replicas": 1}, "decode": {**SMALL, "replicas": 1}}}}


def get(cluster, kind: str, name: str, namespace: str) -> dict | None:
    out = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


@pytest.fixture(scope="module")
def crd(kube_cluster):
    kube_cluster.kubectl("apply", "-f", str(CRD))
    kube_cluster.kubectl("wait", "--for=condition=established", "--timeout=60s",
                         "crd/inferenceclusters.serving.ferry.dev")


def test_operator_renders_owns_reports_and_scales(kube_cluster, crd, monkeypatch):
    ns = kube_cluster.create_namespace("ferry-op")
    monkeypatch.setenv("KUBECONFIG", str(kube_cluster.kubeconfig))
    monkeypatch.setenv("FERRY_OPERATOR_NAMESPACE", ns)
    monkeypatch.setenv("FERRY_OPERATOR_BIND_POD_IP", str(kube_cluster.is_local))   # pods share loopback there
    args = ["run", "--standalone", "-n", ns, "-m", "operators.ferry_operator.handlers"]
    with KopfRunner(args, timeout=180) as runner:
        kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(inference_cluster(ns)))
        ic = get(kube_cluster, "inferencecluster", NAME, ns)
        expected = [("configmap", f"{NAME}-config")] + [
            ("deployment", f"{NAME}-{c}") for c in ("scheduler", "kvstore", "gateway", "prefill", "decode")] + [
            ("service", f"{NAME}-{c}") for c in ("scheduler", "kvstore", "gateway")] + [
            ("poddisruptionbudget", f"{NAME}-{p}") for p in ("prefill", "decode")]

        def all_created() -> bool:
            return all(get(kube_cluster, kind, name, ns) is not None for kind, name in expected)
        assert eventually(all_created, timeout=60, interval=0.5), kube_cluster.kubectl("get", "all", "-n", ns).stdout
        for kind, name in expected:
            obj = get(kube_cluster, kind, name, ns)
            (owner,) = obj["metadata"]["ownerReferences"]
            assert (owner["uid"], owner["controller"], owner["kind"]) == (ic["metadata"]["uid"], True, "InferenceCluster")
            assert obj["metadata"]["annotations"]["serving.ferry.dev/spec-hash"]
            assert obj["metadata"]["labels"]["serving.ferry.dev/cluster"] == NAME

        def observed_generation() -> int | None:
            return (get(kube_cluster, "inferencecluster", NAME, ns).get("status") or {}).get("observedGeneration")
        assert eventually(lambda: observed_generation() == ic["metadata"]["generation"], timeout=30, interval=0.5)
        status = get(kube_cluster, "inferencecluster", NAME, ns)["status"]
        assert {c["type"] for c in status["conditions"]} == {"Ready", "Progressing", "Degraded"}
        assert status["pools"]["decode"]["desiredReplicas"] == 1

        kube_cluster.kubectl("patch", "inferencecluster", NAME, "-n", ns, "--type=merge",
                             "-p", json.dumps({"spec": {"pools": {"decode": {"replicas": 3}}}}))
        assert eventually(lambda: get(kube_cluster, "deployment", f"{NAME}-decode", ns)["spec"]["replicas"] == 3,
                          timeout=30, interval=0.5)
        generation = get(kube_cluster, "inferencecluster", NAME, ns)["metadata"]["generation"]
        assert eventually(lambda: observed_generation() == generation, timeout=30, interval=0.5)
        assert get(kube_cluster, "inferencecluster", NAME, ns)["status"]["pools"]["decode"]["replicas"] == 3

        # no finalizer: deleting a cluster never waits for the operator (helm uninstall removes both)
        assert not get(kube_cluster, "inferencecluster", NAME, ns)["metadata"].get("finalizers")
        # deleted while the operator runs: the API server's GC takes what it owned
        kube_cluster.kubectl("delete", "inferencecluster", NAME, "-n", ns, "--timeout=30s")
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


def ready_pods(cluster, namespace: str, component: str) -> list[dict]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json", "-l", f"app.kubernetes.io/component={component}")
    return [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])]


def live_pods(cluster, namespace: str, component: str) -> list[str]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json", "-l", f"app.kubernetes.io/component={component}")
    return [p["metadata"]["name"] for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]


def instances(address: str) -> dict[str, scheduler_pb2.InstanceStatus]:
    with grpc.insecure_channel(address) as channel:
        reply = scheduler_pb2_grpc.SchedulerStub(channel).ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=5)
    return {s.instance.instance_id: s for s in reply.instances}


def test_scale_down_drains_and_spot_taint_notifies_the_real_scheduler(kube_cluster, crd, monkeypatch):
    if not kube_cluster.is_local:
        pytest.skip("needs pod IPs reachable from the test process (the local control plane's kubelet)")
    ns = kube_cluster.create_namespace("ferry-op")
    monkeypatch.setenv("KUBECONFIG", str(kube_cluster.kubeconfig))
    monkeypatch.setenv("FERRY_OPERATOR_NAMESPACE", ns)
    monkeypatch.setenv("FERRY_OPERATOR_BIND_POD_IP", "true")
    args = ["run", "--standalone", "-n", ns, "-m", "operators.ferry_operator.handlers"]
    ic = inference_cluster(ns)
    ic["spec"]["pools"]["decode"]["replicas"] = 2
    with KopfRunner(args, timeout=180) as runner:        # 1: create; the scheduler comes up
        kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(ic))
        assert eventually(lambda: ready_pods(kube_cluster, ns, "scheduler"), timeout=120, interval=1)
    assert runner.exception is None, runner.output
    address = f"{ready_pods(kube_cluster, ns, 'scheduler')[0]['status']['podIP']}:50050"
    # 2: the operator reaches that scheduler (this process has no cluster DNS for <name>-scheduler.<ns>.svc)
    monkeypatch.setenv("FERRY_OPERATOR_SCHEDULER_ADDRESS", address)
    with KopfRunner(args, timeout=240) as runner:
        def decode() -> list[str]:
            return live_pods(kube_cluster, ns, "decode")
        assert eventually(lambda: len([i for i in instances(address) if i in decode()]) == 2
                          and len(ready_pods(kube_cluster, ns, "decode")) == 2, timeout=120, interval=1)
        before = set(decode())
        kube_cluster.kubectl("patch", "inferencecluster", NAME, "-n", ns, "--type=merge",
                             "-p", json.dumps({"spec": {"pools": {"decode": {"replicas": 1}}}}))
        assert eventually(lambda: len(decode()) == 1, timeout=60, interval=0.5), runner.output[-3000:]
        assert get(kube_cluster, "deployment", f"{NAME}-decode", ns)["spec"]["replicas"] == 1
        assert set(decode()) < before                 # one of the two went, and no replacement came
        status = get(kube_cluster, "inferencecluster", NAME, ns)["status"]["pools"]["decode"]
        assert status["draining"] == [] and status["desiredReplicas"] == 1

        (survivor,) = decode()
        node = get(kube_cluster, "pod", survivor, ns)["spec"]["nodeName"]
        kube_cluster.kubectl("taint", "node", node, "aws-node-termination-handler/spot-itn=true:NoSchedule")
        try:
            assert eventually(lambda: instances(address)[survivor].load.draining, timeout=30, interval=0.5), \
                runner.output[-3000:]
        finally:
            kube_cluster.kubectl("taint", "node", node, "aws-node-termination-handler/spot-itn-", check=False)
        kube_cluster.kubectl("delete", "inferencecluster", NAME, "-n", ns, "--timeout=30s")
    assert runner.exception is None, runner.output
