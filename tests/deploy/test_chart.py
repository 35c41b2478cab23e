"""The Helm chart (deploy/helm/ferry) rendered offline: lint, every values variant that matters,
labels, security contexts, RBAC, and the InferenceCluster against the CRD's own schema."""
from __future__ import annotations

import json

import pytest

from tests.deploy.chart import (
    CHART,
    MONITORING,
    NAMESPACE,
    RELEASE,
    crd_spec_schema,
    find,
    helm,
    one,
    pod_specs,
    render,
)

VARIANTS = {
    "defaults": (),
    "monitoring": MONITORING,
    "external-redis": ("--set", "redis.external.url=redis://redis.shared.svc:6379/2"),
    "watch-all-namespaces": ("--set", "operator.watchAllNamespaces=true"),
    "bind-pod-ip": ("--set", "operator.bindPodIP=true"),
    "kube-1.20": ("--kube-version", "1.20.0"),
    "kube-1.33": ("--kube-version", "1.33.0", *MONITORING),
}
STANDARD_LABELS = ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "app.kubernetes.io/component")
# API versions served by both Kubernetes 1.20 and current releases (nothing removed since).
PORTABLE_API_VERSIONS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "serving.ferry.dev/v1alpha1",
                         "monitoring.coreos.com/v1"}


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def operator_container(objects) -> dict:
    return one(objects, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("args", [(), ("--set", "monitoring.assumeCRDs=true"), ("--kube-version", "1.20.0"),
                                  ("--set", "operator.watchAllNamespaces=true",
                                   "--set", "redis.external.url=redis://r:6379/0")],
                         ids=["defaults", "monitoring", "kube-1.20", "watch-all-external-redis"])
def test_lint_strict_is_clean(args):
    out = helm("lint", "--strict", str(CHART), *args)
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_defaults_render_the_operator_redis_and_one_cluster():
    objects = render()
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted([
        ("ServiceAccount", "ferry-operator"), ("Role", "ferry-operator"), ("RoleBinding", "ferry-operator"),
        ("ClusterRole", f"{NAMESPACE}-ferry-operator-nodes"),
        ("ClusterRoleBinding", f"{NAMESPACE}-ferry-operator-nodes"),
        ("Deployment", "ferry-operator"), ("Deployment", "ferry-redis"), ("Service", "ferry-redis"),
        ("InferenceCluster", "ferry"), ("ConfigMap", "ferry-dashboard-ferry-overview"),
        ("ConfigMap", "ferry-dashboard-ferry-workers")])
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in objects if not o["kind"].startswith("Cluster"))
    ic = one(objects, "InferenceCluster")
    assert ic["spec"]["scheduler"]["redisURL"] == f"redis://ferry-redis.{NAMESPACE}.svc:6379/0"
    assert ic["spec"]["images"] == {"controlPlane": "ghcr.io/ferry-serving/ferry:0.1.0",
                                    "worker": "ghcr.io/ferry-serving/ferry-worker:0.1.0",
                                    "pullPolicy": "IfNotPresent"}


def test_operator_runs_the_module_with_its_settings():
    c = operator_container(render())
    assert c["command"] == ["python", "-m", "operators.ferry_operator"]
    assert c["image"] == "ghcr.io/ferry-serving/ferry:0.1.0"
    env = env_of(c)
    assert env["FERRY_OPERATOR_NAMESPACE"] == NAMESPACE
    assert env["FERRY_OPERATOR_CONTROL_PLANE_IMAGE"] == "ghcr.io/ferry-serving/ferry:0.1.0"
    assert env["FERRY_OPERATOR_WORKER_IMAGE"] == "ghcr.io/ferry-serving/ferry-worker:0.1.0"
    assert env["FERRY_OPERATOR_BIND_POD_IP"] == "false"
    assert {"POD_NAME", "POD_NAMESPACE", "POD_IP", "NODE_NAME"} <= env.keys()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert one(render(), "Deployment", "ferry-operator")["spec"]["strategy"]["type"] == "Recreate"


def test_bind_pod_ip_reaches_the_operator_and_redis():
    objects = render(*VARIANTS["bind-pod-ip"])
    assert env_of(operator_container(objects))["FERRY_OPERATOR_BIND_POD_IP"] == "true"
    redis = one(objects, "Deployment", "ferry-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["command"][redis["command"].index("--bind") + 1] == "$(POD_IP)"
    assert env_of(redis).keys() >= {"POD_IP"}
    default = one(render(), "Deployment", "ferry-redis")["spec"]["template"]["spec"]["containers"][0]
    assert default["command"] == ["redis-server", "--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no",
                                  "--save", "", "--appendonly", "no"]
    assert default["image"] == "redis:7.2-alpine"


@pytest.mark.parametrize("args, url, bundled", [
    ((), f"redis://ferry-redis.{NAMESPACE}.svc:6379/0", True),
    (VARIANTS["external-redis"], "redis://redis.shared.svc:6379/2", False),
    (("--set", "redis.enabled=false"), None, False),
    (("--set", "cluster.scheduler.redisURL=redis://mine:6379/1"), "redis://mine:6379/1", True),
], ids=["bundled", "external", "none", "set-in-cluster"])
def test_redis_choice(args, url, bundled):
    objects = render(*args)
    assert one(objects, "InferenceCluster")["spec"]["scheduler"].get("redisURL") == url
    assert len(find(objects, "Deployment", "ferry-redis")) == bundled
    assert len(find(objects, "Service", "ferry-redis")) == bundled


def test_watch_all_namespaces_uses_cluster_roles():
    objects = render(*VARIANTS["watch-all-namespaces"])
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    main = one(objects, "ClusterRole", f"{NAMESPACE}-ferry-operator")
    assert {"pods"} <= {r for rule in main["rules"] for r in rule["resources"]}
    binding = one(objects, "ClusterRoleBinding", f"{NAMESPACE}-ferry-operator")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": f"{NAMESPACE}-ferry-operator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ferry-operator", "namespace": NAMESPACE}]
    assert env_of(operator_container(objects))["FERRY_OPERATOR_NAMESPACE"] == ""


def test_namespaced_operator_reads_pods_only_in_its_namespace():
    objects = render()
    role = one(objects, "Role")
    assert ("", "pods") in {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    nodes = one(objects, "ClusterRole")
    assert nodes["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbac_is_least_privilege(variant):
    rules = [r for o in render(*VARIANTS[variant]) if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]
    granted = {(g, res): set(r["verbs"]) for r in rules for g in r["apiGroups"] for res in r["resources"]}
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert not rule.get("nonResourceURLs"), rule
    assert not {res for _, res in granted} & {"secrets", "serviceaccounts", "roles", "rolebindings",
                                                "clusterroles", "clusterrolebindings", "pods/exec"}
    # Exactly what the operator calls: tests/deploy/test_rbac.py names the call site of each verb.
    assert granted[("serving.ferry.dev", "inferenceclusters")] == {"get", "list", "watch", "patch"}
    assert granted[("serving.ferry.dev", "inferenceclusters/status")] == {"patch"}
    for key in (("apps", "deployments"), ("", "services"), ("", "configmaps"), ("policy", "poddisruptionbudgets")):
        assert granted[key] == {"list", "create", "patch", "delete"}, key
    assert granted[("", "pods")] == {"list", "delete"}
    assert granted[("", "events")] == {"create"} and ("events.k8s.io", "events") not in granted
    assert granted[("", "nodes")] == {"list", "watch"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_has_the_standard_labels(variant):
    for o in render(*VARIANTS[variant]):
        labels = o["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if not labels.get(k)]
        assert not missing, f"{o['kind']} {o['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/name"] == "ferry" and labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert o["apiVersion"] in PORTABLE_API_VERSIONS, (o["kind"], o["apiVersion"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_non_root_read_only_with_resources(variant):
    specs = pod_specs(render(*VARIANTS[variant]))
    assert specs
    for name, spec in specs:
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (name, c["name"])
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], (name, c["name"])
            assert c["resources"]["limits"]["memory"], (name, c["name"])
            assert c.get("livenessProbe"), (name, c["name"])


@pytest.mark.parametrize("version", ["1.20.0", "1.33.0"])
def test_renders_the_same_objects_on_old_and_current_kubernetes(version):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render("--kube-version", version))
    assert kinds == sorted((o["kind"], o["metadata"]["name"]) for o in render())


def test_kubernetes_older_than_1_20_is_refused():
    out = helm("template", RELEASE, str(CHART), "--kube-version", "1.19.0", check=False)
    assert out.returncode != 0 and "kubeVersion" in out.stderr, out.stderr


def test_notes_say_how_to_reach_the_gateway():
    out = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client").stdout
    notes = out[out.index("NOTES:"):]
    assert f"kubectl port-forward -n {NAMESPACE} svc/{RELEASE}-gateway 8000" in notes
    assert "/v1/chat/completions" in notes and f"kubectl get ic -n {NAMESPACE} -w" in notes


def test_images_take_registry_repository_and_tag():
    objects = render("--set", "image.controlPlane.registry=,image.controlPlane.repository=local/ferry,"
                     "image.controlPlane.tag=dev,image.worker.tag=cu13,image.pullSecrets={regcred}")
    ic = one(objects, "InferenceCluster")
    assert ic["spec"]["images"]["controlPlane"] == "local/ferry:dev"
    assert ic["spec"]["images"]["worker"] == "ghcr.io/ferry-serving/ferry-worker:cu13"
    assert ic["spec"]["images"]["pullSecrets"] == ["regcred"]
    assert operator_container(objects)["image"] == "local/ferry:dev"
    assert all(spec["imagePullSecrets"] == [{"name": "regcred"}] for _, spec in pod_specs(objects))


def test_fullname_and_cluster_name():
    objects = render("--set", "fullnameOverride=serve,cluster.name=llama")
    assert one(objects, "InferenceCluster")["metadata"]["name"] == "llama"
    assert one(objects, "Deployment", "serve-operator") and one(objects, "Service", "serve-redis")
    assert not find(render("--set", "cluster.create=false"), "InferenceCluster")


def test_server_side_values_reach_the_cluster_spec():
    """What the e2e harness sets (tests/e2e, tests/kube/cluster.py: helm_values) lands in the spec as is."""
    values = {"operator": {"bindPodIP": True}, "redis": {"bindPodIP": True},
              "cluster": {"model": {"name": "SmolLM2-135M-Instruct", "path": "/src/models/SmolLM2-135M-Instruct",
                                    "mountPath": "/src/models", "volume": {"hostPath": {"path": "/src/models"}},
                                    "engine": "llm", "device": "cpu", "dtype": "float32"},
                          "pools": {"decode": {"replicas": 2, "kvCacheMemoryGiB": 0.25, "maxNumSeqs": 16,
                                               "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}},
                          "drain": {"timeoutSeconds": 120}}}
    spec = one(render("--set-json", f"operator={json.dumps(values['operator'])}",
                      "--set-json", f"redis={json.dumps(values['redis'])}",
                      "--set-json", f"cluster={json.dumps(values['cluster'])}"), "InferenceCluster")["spec"]
    assert spec["model"] == values["cluster"]["model"] | {"simProfile": "llama3-8b-h100"}
    decode = spec["pools"]["decode"]
    assert decode["replicas"] == 2 and decode["kvCacheMemoryGiB"] == 0.25
    assert decode["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}}   # cpu: no GPU limit
    assert spec["drain"] == {"timeoutSeconds": 120}


@pytest.mark.parametrize("args, gpus", [
    ((), 1),
    (("--set", "gpu.perWorker=2"), 2),
    (("--set", "cluster.model.engine=sim"), None),
    (("--set", "cluster.model.device=cpu"), None),
    (("--set", "gpu.perWorker=0"), None),
    (("--set", "cluster.pools.decode.resources.limits.nvidia\\.com/gpu=4"), 4),
], ids=["default", "two", "sim", "cpu", "off", "explicit"])
def test_llm_workers_on_cuda_get_a_gpu_limit(args, gpus):
    pools = one(render(*args), "InferenceCluster")["spec"]["pools"]
    assert pools["decode"]["resources"].get("limits", {}).get("nvidia.com/gpu") == gpus


def unknown_fields(value, schema: dict, path: str = "spec") -> list[str]:
    """Fields the API server would prune silently: not declared by the structural schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, list):
        return [f for i, v in enumerate(value) for f in unknown_fields(v, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    found = []
    for key, v in value.items():
        if "properties" in schema and key not in schema["properties"]:
            found.append(f"{path}.{key}")
            continue
        sub = schema["properties"][key] if "properties" in schema else schema.get("additionalProperties") or {}
        found += unknown_fields(v, sub, f"{path}.{key}")
    return found


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_cluster_validates_against_the_crd(variant):
    jsonschema = pytest.importorskip("jsonschema")
    ic = one(render(*VARIANTS[variant]), "InferenceCluster")
    schema = crd_spec_schema()
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(ic)]
    assert not errors, errors
    assert not unknown_fields(ic["spec"], schema["properties"]["spec"])


@pytest.mark.parametrize("args, env", [
    ((), None),
    (("--set", "gpu.powerControl=clocks"), "clocks"),
    (("--set", "gpu.powerControl=power-limit", "--set-json",
      'cluster.pools.decode.env=[{"name":"FERRY_WORKER_POWER_CONTROL","value":"off"}]'), "off"),
], ids=["default-read-only", "clocks", "pool-env-wins"])
def test_gpu_power_control_reaches_the_workers_env(args, env):
    pools = one(render(*args), "InferenceCluster")["spec"]["pools"]
    found = [e["value"] for e in pools["decode"].get("env", []) if e["name"] == "FERRY_WORKER_POWER_CONTROL"]
    assert found == ([] if env is None else [env])


def test_gpu_power_control_is_checked_by_the_schema():
    with pytest.raises(Exception, match="powerControl|clock"):
        render("--set", "gpu.powerControl=turbo")


def preemption_env(pool: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pool.get("env", []) if e["name"].startswith("FERRY_WORKER_PREEMPTION_")}


@pytest.mark.parametrize("args, env", [
    ((), {}),
    (("--set", "spot.metadataSource=aws"), {"FERRY_WORKER_PREEMPTION_SOURCE": "aws",
                                            "FERRY_WORKER_PREEMPTION_POLL_S": "5",
                                            "FERRY_WORKER_PREEMPTION_GRACE_S": "30"}),
    (("--set", "spot.metadataSource=gcp", "--set-json", "spot.pollSeconds=2.5", "--set", "spot.graceSeconds=25"),
     {"FERRY_WORKER_PREEMPTION_SOURCE": "gcp", "FERRY_WORKER_PREEMPTION_POLL_S": "2.5",
      "FERRY_WORKER_PREEMPTION_GRACE_S": "25"}),
    (("--set", "spot.metadataSource=azure", "--set-json",
      'cluster.pools.decode.env=[{"name":"FERRY_WORKER_PREEMPTION_SOURCE","value":"none"}]'),
     {"FERRY_WORKER_PREEMPTION_SOURCE": "none", "FERRY_WORKER_PREEMPTION_POLL_S": "5",
      "FERRY_WORKER_PREEMPTION_GRACE_S": "30"}),
], ids=["default-off", "aws", "gcp-tuned", "pool-env-wins"])
def test_spot_preemption_metadata_reaches_the_workers_env(args, env):
    pools = one(render(*args), "InferenceCluster")["spec"]["pools"]
    assert preemption_env(pools["decode"]) == env
    if env:
        assert preemption_env(pools["prefill"])["FERRY_WORKER_PREEMPTION_POLL_S"] == env["FERRY_WORKER_PREEMPTION_POLL_S"]


@pytest.mark.parametrize("args", [("--set", "spot.metadataSource=ibm"), ("--set", "spot.pollSeconds=0")])
def test_spot_preemption_values_are_checked_by_the_schema(args):
    with pytest.raises(Exception, match="metadataSource|pollSeconds|spot"):
        render(*args)
