"""render(): the objects docs/kubernetes.md promises — names, labels/selectors, env, probes, security,
owner references, PDB API version, bind_pod_ip, and a spec-hash that is stable and sensitive."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from operators.ferry_operator.manifests import RenderOptions, key_of, render, spec_hash
from operators.ferry_operator.names import ClusterRef
from operators.ferry_operator.podspec import SPOT_TOLERATIONS
from operators.ferry_operator.spec import parse_spec
from services.gateway.main import GatewaySettings
from services.kvstore.main import KVStoreSettings
from services.scheduler.main import SchedulerSettings
from services.worker.main import WorkerSettings

REF = ClusterRef("demo", "serving", "uid-7")
SPEC = {"model": {"name": "llama", "path": "/models/llama", "volume": {"persistentVolumeClaim": {"claimName": "m"}}},
        "pools": {"decode": {"replicas": 2, "spot": True, "nodeSelector": {"gpu": "h100"},
                             "resources": {"limits": {"nvidia.com/gpu": 1}}, "kvCacheMemoryGiB": 0.25,
                             "env": [{"name": "FERRY_WORKER_MAX_NUM_SEQS", "value": "8"}]}}}
COMPONENTS = ("scheduler", "kvstore", "gateway", "prefill", "decode")


def objects(spec=None, **options) -> dict:
    rendered = render(REF, parse_spec(spec or SPEC), RenderOptions(**options))
    return {key_of(o): o for o in rendered}


def deployment(component: str, **options) -> dict:
    return objects(**options)[("Deployment", f"demo-{component}")]


def container(component: str, **options) -> dict:
    return deployment(component, **options)["spec"]["template"]["spec"]["containers"][0]


def env(component: str, **options) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(component, **options)["env"]}


def test_the_documented_objects_and_nothing_else():
    assert sorted(objects()) == sorted([
        ("ConfigMap", "demo-config"),
        *((kind, f"demo-{c}") for c in ("scheduler", "kvstore", "gateway") for kind in ("Deployment", "Service")),
        *((kind, f"demo-{p}") for p in ("prefill", "decode") for kind in ("Deployment", "PodDisruptionBudget"))])


def test_kvstore_disabled_renders_no_kvstore_and_workers_get_no_address():
    objs = objects({**SPEC, "kvstore": {"enabled": False}})
    assert not [k for k in objs if k[1] == "demo-kvstore"]
    assert objs[("ConfigMap", "demo-config")]["data"]["FERRY_WORKER_KVSTORE_ADDRESS"] == ""


def test_labels_owner_and_namespace_on_every_object():
    for (kind, name), obj in objects().items():
        meta = obj["metadata"]
        assert meta["namespace"] == "serving"
        assert {"app.kubernetes.io/name": "ferry", "app.kubernetes.io/instance": "demo",
                "app.kubernetes.io/part-of": "ferry", "app.kubernetes.io/managed-by": "ferry-operator",
                "serving.ferry.dev/cluster": "demo"}.items() <= meta["labels"].items(), name
        if kind != "ConfigMap":
            assert meta["labels"]["app.kubernetes.io/component"] == name.removeprefix("demo-")
        assert meta["ownerReferences"] == [{"apiVersion": "serving.ferry.dev/v1alpha1", "kind": "InferenceCluster",
                                            "name": "demo", "uid": "uid-7", "controller": True,
                                            "blockOwnerDeletion": True}]


@pytest.mark.parametrize("component", COMPONENTS)
def test_selectors_match_the_pod_template(component):
    objs = objects()
    dep = objs[("Deployment", f"demo-{component}")]
    selector = {"serving.ferry.dev/cluster": "demo", "app.kubernetes.io/component": component}
    assert dep["spec"]["selector"] == {"matchLabels": selector}
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    other = objs.get(("Service", f"demo-{component}")) or objs[("PodDisruptionBudget", f"demo-{component}")]
    assert (other["spec"]["selector"].get("matchLabels") or other["spec"]["selector"]) == selector


@pytest.mark.parametrize(("component", "ports"), [
    ("scheduler", {"grpc": 50050, "metrics": 9090}), ("kvstore", {"grpc": 50051, "metrics": 9090}),
    ("gateway", {"http": 8000, "grpc-sink": 50070}),
])
def test_service_ports(component, ports):
    svc = objects()[("Service", f"demo-{component}")]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
    assert {p["name"] for p in container(component)["ports"]} == set(ports)
    assert all(p["targetPort"] == p["name"] for p in svc["spec"]["ports"])


def test_pdbs_allow_one_pod_down_and_follow_the_api_version():
    for version in ("policy/v1", "policy/v1beta1"):
        pdb = objects(pdb_api_version=version)[("PodDisruptionBudget", "demo-decode")]
        assert pdb["apiVersion"] == version and pdb["spec"]["maxUnavailable"] == 1
    with pytest.raises(ValueError, match="pdb_api_version"):
        RenderOptions(pdb_api_version="policy/v2")


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_pod_has_downward_env_and_reads_the_config_map(component):
    c = container(component)
    e = env(component)
    for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                       ("POD_IP", "status.podIP"), ("NODE_NAME", "spec.nodeName")):
        assert e[name] == {"fieldRef": {"fieldPath": path}}
    assert c["envFrom"] == [{"configMapRef": {"name": "demo-config"}}]
    assert c["command"] == ["ferry", "serve", component]
    names = [x["name"] for x in c["env"]]
    assert names.index("POD_IP") < min(names.index(n) for n in names if "$(POD" in str(e[n]) or n.endswith("HOST"))


@pytest.mark.parametrize(("bind", "host"), [(False, "0.0.0.0"), (True, "$(POD_IP)")])
@pytest.mark.parametrize(("component", "prefix"), [
    ("scheduler", "FERRY_SCHEDULER_"), ("kvstore", "FERRY_KVSTORE_"), ("gateway", "FERRY_GATEWAY_"),
    ("prefill", "FERRY_WORKER_"), ("decode", "FERRY_WORKER_")])
def test_listen_address_follows_bind_pod_ip(bind, host, component, prefix):
    assert env(component, bind_pod_ip=bind)[prefix + "HOST"] == host


def test_worker_and_gateway_env():
    decode = env("decode")
    assert decode["FERRY_WORKER_INSTANCE_ID"] == "$(POD_NAME)"
    assert decode["FERRY_WORKER_ADVERTISE_ADDRESS"] == "$(POD_IP):50060"
    assert decode["FERRY_WORKER_KV_CACHE_MEMORY_GB"] == "0.25"
    assert decode["FERRY_WORKER_MAX_NUM_SEQS"] == "8"             # the user's env wins (it comes last)
    assert "FERRY_WORKER_KV_CACHE_MEMORY_GB" not in env("prefill")
    assert env("gateway")["FERRY_GATEWAY_SINK_ADVERTISE_ADDRESS"] == "$(POD_IP):50070"


AUTOSCALED = {**SPEC, "scheduler": {"autoscaling": {"enabled": True}}}


@pytest.mark.parametrize("spec", [SPEC, AUTOSCALED], ids=["static", "autoscaled"])
def test_config_map_names_real_settings_with_in_cluster_addresses(spec):
    data = objects(spec)[("ConfigMap", "demo-config")]["data"]
    fields = {"FERRY_SCHEDULER_": SchedulerSettings, "FERRY_KVSTORE_": KVStoreSettings,
              "FERRY_GATEWAY_": GatewaySettings, "FERRY_WORKER_": WorkerSettings}
    for key in data:
        prefix = next(p for p in fields if key.startswith(p))
        assert key.removeprefix(prefix).lower() in {f.name for f in dataclasses.fields(fields[prefix])}, key
    for component in COMPONENTS:                       # per-pod env too
        for name in env(component):
            prefix = next((p for p in fields if name.startswith(p)), None)
            if prefix:
                assert name.removeprefix(prefix).lower() in {f.name for f in dataclasses.fields(fields[prefix])}
    assert data["FERRY_WORKER_SCHEDULER_ADDRESS"] == data["FERRY_GATEWAY_SCHEDULER_ADDRESS"] \
        == "demo-scheduler.serving.svc:50050"
    assert data["FERRY_WORKER_KVSTORE_ADDRESS"] == "demo-kvstore.serving.svc:50051"
    assert (data["FERRY_WORKER_MODEL"], data["FERRY_WORKER_SERVED_MODEL_NAME"]) == ("/models/llama", "llama")
    assert data["FERRY_SCHEDULER_METRICS_PORT"] == data["FERRY_WORKER_METRICS_PORT"] == "9090"
    assert all(isinstance(v, str) for v in data.values())


def test_migration_disabled_sets_interval_zero():
    data = objects({**SPEC, "scheduler": {"migration": {"enabled": False}}})[("ConfigMap", "demo-config")]["data"]
    assert data["FERRY_SCHEDULER_MIGRATION_INTERVAL_S"] == "0"


@pytest.mark.parametrize(("component", "ready", "live"), [
    ("scheduler", {"tcpSocket": {"port": "grpc"}}, {"tcpSocket": {"port": "grpc"}}),
    ("kvstore", {"tcpSocket": {"port": "grpc"}}, {"tcpSocket": {"port": "grpc"}}),
    ("gateway", {"httpGet": {"path": "/health", "port": "http"}}, {"httpGet": {"path": "/health", "port": "http"}}),
    ("decode", {"httpGet": {"path": "/readyz", "port": "metrics"}}, {"httpGet": {"path": "/healthz", "port": "metrics"}}),
])
def test_probes(component, ready, live):
    c = container(component)
    assert ready.items() <= c["readinessProbe"].items() and live.items() <= c["livenessProbe"].items()
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert component not in ("prefill", "decode") or named == {"grpc": 50060, "metrics": 9090}


@pytest.mark.parametrize("component", COMPONENTS)
def test_security_context_and_tmp(component):
    pod = deployment(component)["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize(("component", "mounted"), [
    ("gateway", True), ("prefill", True), ("decode", True), ("scheduler", False), ("kvstore", False)])
def test_model_volume_read_only_where_the_model_is_read(component, mounted):
    pod = deployment(component)["spec"]["template"]["spec"]
    mount = {"name": "model", "mountPath": "/models", "readOnly": True}
    assert (mount in pod["containers"][0]["volumeMounts"]) == mounted
    assert ({"name": "model", "persistentVolumeClaim": {"claimName": "m"}} in pod["volumes"]) == mounted
    no_volume = objects({"model": {"name": "m"}})[("Deployment", f"demo-{component}")]
    assert [v["name"] for v in no_volume["spec"]["template"]["spec"]["volumes"]] == ["tmp"]


def test_pool_scheduling_resources_and_spot():
    decode, prefill = deployment("decode")["spec"]["template"]["spec"], deployment("prefill")["spec"]["template"]["spec"]
    assert decode["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert prefill["containers"][0]["resources"] == {}                 # GPUs only through the user's resources
    assert decode["nodeSelector"] == {"gpu": "h100"} and "nodeSelector" not in prefill
    assert decode["tolerations"] == list(SPOT_TOLERATIONS) and "tolerations" not in prefill


def test_images_from_spec_or_operator_defaults():
    assert container("scheduler", control_plane_image="cp:9")["image"] == "cp:9"
    assert container("decode", worker_image="w:9")["image"] == "w:9"
    objs = objects({**SPEC, "images": {"controlPlane": "x/cp:1", "worker": "x/w:1", "pullSecrets": ["reg"]}},
                   control_plane_image="cp:9")
    pod = objs[("Deployment", "demo-gateway")]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "x/cp:1" and pod["imagePullSecrets"] == [{"name": "reg"}]
    assert objs[("Deployment", "demo-decode")]["spec"]["template"]["spec"]["containers"][0]["image"] == "x/w:1"


def test_spec_hash_is_the_annotation_and_stable():
    first, second = objects(), objects()
    for key, obj in first.items():
        assert obj["metadata"]["annotations"]["serving.ferry.dev/spec-hash"] == spec_hash(obj)
        assert spec_hash(obj) == spec_hash(second[key])
        reordered = copy.deepcopy(obj)
        reordered["metadata"] = dict(reversed(list(reordered["metadata"].items())))
        assert spec_hash(reordered) == spec_hash(obj)


def test_spec_hash_ignores_pool_replicas_but_not_gateway_replicas():
    def hashes(spec):
        return {k: o["metadata"]["annotations"]["serving.ferry.dev/spec-hash"] for k, o in objects(spec).items()}
    base = hashes(SPEC)
    more_decode = hashes({**SPEC, "pools": {"decode": {**SPEC["pools"]["decode"], "replicas": 5}}})
    assert more_decode == base
    assert objects({**SPEC, "pools": {"decode": {**SPEC["pools"]["decode"], "replicas": 5}}})[
        ("Deployment", "demo-decode")]["spec"]["replicas"] == 5
    more_gateways = hashes({**SPEC, "gateway": {"replicas": 3}})
    assert [k for k in base if more_gateways[k] != base[k]] == [("Deployment", "demo-gateway")]


def test_a_config_change_rolls_every_pod_template():
    def config_hashes(spec):
        return {k: o["spec"]["template"]["metadata"]["annotations"]["serving.ferry.dev/config-hash"]
                for k, o in objects(spec).items() if k[0] == "Deployment"}
    before, after = config_hashes(SPEC), config_hashes({**SPEC, "scheduler": {"routing": "round_robin"}})
    assert len(set(before.values())) == 1 and all(after[k] != before[k] for k in before)


def test_autoscaling_settings_reach_the_scheduler_with_the_pools_bounds():
    static = objects()[("ConfigMap", "demo-config")]["data"]
    assert "FERRY_SCHEDULER_AUTOSCALE_INTERVAL_S" not in static            # off by default
    assert static["FERRY_GATEWAY_SLO_TTFT_MS"] == static["FERRY_SCHEDULER_SLO_TTFT_MS"] == "2000.0"
    data = objects(AUTOSCALED)[("ConfigMap", "demo-config")]["data"]
    assert data["FERRY_SCHEDULER_AUTOSCALE_INTERVAL_S"] == "15.0"
    assert data["FERRY_SCHEDULER_AUTOSCALE_DECODE_REPLICAS"] == "0:16"
    assert data["FERRY_SCHEDULER_AUTOSCALE_PROFILE"] == "llama3-8b-h100"
    assert data["FERRY_SCHEDULER_GATEWAY_METRICS_URLS"] == "http://demo-gateway.serving.svc:8000/metrics"
    prom = {**SPEC, "scheduler": {"autoscaling": {"enabled": True, "prometheusURL": "http://prom:9090"}}}
    data = objects(prom)[("ConfigMap", "demo-config")]["data"]
    assert data["FERRY_SCHEDULER_PROMETHEUS_URL"] == "http://prom:9090"
    assert data["FERRY_SCHEDULER_PROMETHEUS_SELECTOR"] == 'namespace="serving",ferry_cluster="demo"'
    assert "FERRY_SCHEDULER_GATEWAY_METRICS_URLS" not in data
