"""parse_spec(): the CRD's defaults, camelCase → fields, and validation messages that say what to fix."""
from __future__ import annotations

import pytest

from operators.ferry_operator.spec import PoolSpec, parse_spec

MINIMAL = {"model": {"name": "llama"}}


@pytest.mark.parametrize(("path", "expected"), [
    ("model.path", "/models/model"), ("model.mount_path", "/models"), ("model.engine", "llm"),
    ("model.sim_profile", "llama3-8b-h100"), ("model.dtype", "bfloat16"), ("model.device", "cuda"),
    ("model.volume", None), ("images.pull_policy", "IfNotPresent"), ("images.control_plane", ""),
    ("gateway.replicas", 1), ("gateway.port", 8000), ("gateway.service_type", "ClusterIP"),
    ("scheduler.routing", "ferry"), ("scheduler.migration_enabled", True), ("scheduler.migration_interval_s", 0.5),
    ("scheduler.migration_policies", ()), ("scheduler.redis_url", ""), ("kvstore.enabled", True),
    ("kvstore.capacity_gib", 4.0), ("decode.replicas", 1), ("decode.min_replicas", 0), ("decode.max_replicas", 16),
    ("prefill.is_spot", False), ("prefill.kv_cache_memory_gib", None), ("prefill.gpu_memory_utilization", 0.85),
    ("prefill.max_num_seqs", 64), ("prefill.tolerations", ()), ("drain_timeout_s", 300), ("power_budget_watts", 0.0),
])
def test_defaults(path, expected):
    value = parse_spec(MINIMAL)
    for part in path.split("."):
        value = getattr(value, part)
    assert value == expected


def test_fields_are_read_from_their_camel_case_names():
    spec = parse_spec({
        "model": {"name": "m", "path": "/w/m", "mountPath": "/w", "volume": {"hostPath": {"path": "/data"}},
                  "engine": "sim", "simProfile": "p", "dtype": "float32", "device": "cpu"},
        "images": {"controlPlane": "cp:1", "worker": "w:1", "pullPolicy": "Always", "pullSecrets": ["regcred"]},
        "gateway": {"replicas": 2, "port": 8080, "serviceType": "LoadBalancer", "resources": {"limits": {"cpu": 1}}},
        "scheduler": {"routing": "load_aware", "redisURL": "redis://r:6379/0",
                      "migration": {"enabled": False, "intervalSeconds": 1, "policies": ["drain", "priority"]}},
        "kvstore": {"enabled": False, "capacityGiB": 0.5},
        "pools": {"decode": {"replicas": 2, "minReplicas": 1, "maxReplicas": 3, "spot": True,
                             "nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "k", "operator": "Exists"}],
                             "kvCacheMemoryGiB": 0.25, "gpuMemoryUtilization": 0.5, "maxNumSeqs": 8,
                             "env": [{"name": "X", "value": "1"}]}},
        "drain": {"timeoutSeconds": 30}, "power": {"budgetWatts": 1000}})
    assert (spec.model.engine, spec.model.volume, spec.model.mount_path) == ("sim", {"hostPath": {"path": "/data"}}, "/w")
    assert (spec.images.worker, spec.images.pull_secrets) == ("w:1", ("regcred",))
    assert (spec.gateway.service_type, spec.gateway.resources) == ("LoadBalancer", {"limits": {"cpu": 1}})
    assert (spec.scheduler.migration_enabled, spec.scheduler.migration_policies) == (False, ("drain", "priority"))
    assert spec.scheduler.redis_url == "redis://r:6379/0" and not spec.kvstore.enabled
    d = spec.decode
    assert (d.replicas, d.min_replicas, d.max_replicas, d.is_spot, d.max_num_seqs) == (2, 1, 3, True, 8)
    assert (d.node_selector, d.kv_cache_memory_gib, d.env[0]["name"]) == ({"gpu": "h100"}, 0.25, "X")
    assert spec.prefill == PoolSpec() and spec.drain_timeout_s == 30 and spec.power_budget_watts == 1000


@pytest.mark.parametrize(("replicas", "clamped"), [(0, 1), (1, 1), (2, 2), (3, 3), (9, 3)])
def test_pool_clamp(replicas, clamped):
    assert PoolSpec(min_replicas=1, max_replicas=3).clamp(replicas) == clamped


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "spec.model is required"),
    ({"model": {"name": ""}}, "spec.model.name is required"),
    ({"model": "llama"}, "spec.model must be an object"),
    ({**MINIMAL, "pools": {"decode": {"minReplicas": 3, "maxReplicas": 2}}},
     "spec.pools.decode: minReplicas 3 > maxReplicas 2: lower minReplicas or raise maxReplicas"),
    ({**MINIMAL, "pools": {"prefill": {"replicas": -1}}}, "spec.pools.prefill.replicas: must be within [0"),
    ({**MINIMAL, "pools": {"prefill": {"replicas": 1.5}}}, "spec.pools.prefill.replicas: must be an integer"),
    ({**MINIMAL, "pools": {"prefill": {"gpuMemoryUtilization": 2}}}, "gpuMemoryUtilization: must be within"),
    ({**MINIMAL, "pools": {"prefill": {"tolerations": {"key": "x"}}}}, "spec.pools.prefill.tolerations: must be a list"),
    ({**MINIMAL, "pools": {"prefill": {"tolerations": ["x"]}}}, "tolerations must list Toleration objects"),
    ({**MINIMAL, "pools": {"decode": {"env": [{"value": "1"}]}}}, "spec.pools.decode.env must list EnvVar objects"),
    ({**MINIMAL, "pools": {"decode": {"spot": "yes"}}}, "spec.pools.decode.spot: must be true or false"),
    ({**MINIMAL, "pools": {"decode": {"resources": ["cpu"]}}}, "spec.pools.decode.resources: must be an object"),
    ({"model": {"name": "m", "engine": "vllm"}}, "spec.model.engine: use one of llm, sim"),
    ({"model": {"name": "m", "device": "tpu"}}, "spec.model.device: use one of cuda, cpu"),
    ({**MINIMAL, "gateway": {"port": 70000}}, "spec.gateway.port: must be within [1, 65535]"),
    ({**MINIMAL, "gateway": {"replicas": 0}}, "spec.gateway.replicas: must be within [1"),
    ({**MINIMAL, "gateway": {"serviceType": "Ingress"}}, "spec.gateway.serviceType: use one of ClusterIP"),
    ({**MINIMAL, "drain": {"timeoutSeconds": 0}}, "spec.drain.timeoutSeconds: must be within [1"),
    ({**MINIMAL, "scheduler": {"migration": {"policies": ["priority"]}}}, "policies must include drain"),
    ({**MINIMAL, "scheduler": {"migration": {"policies": ["drain", "magic"]}}}, "unknown ['magic']"),
    ({**MINIMAL, "images": {"pullSecrets": [""]}}, "spec.images.pullSecrets must list Secret names"),
    ({**MINIMAL, "images": {"pullPolicy": "Sometimes"}}, "spec.images.pullPolicy: use one of Always"),
])
def test_invalid_specs_say_what_to_fix(spec, message):
    with pytest.raises(ValueError, match=None) as info:
        parse_spec(spec)
    assert message in str(info.value)


def test_autoscaling_is_read_from_its_camel_case_names_and_checked():
    spec = parse_spec({**MINIMAL, "scheduler": {"autoscaling": {
        "enabled": True, "intervalSeconds": 5, "windowSeconds": 30, "prometheusURL": "http://prom:9090",
        "sloAttainmentTarget": 0.9, "headroom": 1.5, "scaleUpAfterSeconds": 10, "scaleDownAfterSeconds": 60}}})
    a = spec.scheduler.autoscaling
    assert (a.enabled, a.interval_s, a.window_s, a.prometheus_url, a.attainment_target, a.headroom,
            a.scale_up_after_s, a.scale_down_after_s) == (True, 5, 30, "http://prom:9090", 0.9, 1.5, 10, 60)
    assert not parse_spec(MINIMAL).scheduler.autoscaling.enabled
    for bad, message in (({"windowSeconds": 5, "intervalSeconds": 10}, "windowSeconds 5"),
                         ({"prometheusURL": "prom:9090"}, "must start with http"),
                         ({"headroom": 0.5}, "headroom")):
        with pytest.raises(ValueError, match=message):
            parse_spec({**MINIMAL, "scheduler": {"autoscaling": {"enabled": True, **bad}}})
    with pytest.raises(ValueError, match="set prometheusURL"):
        parse_spec({**MINIMAL, "gateway": {"replicas": 2}, "scheduler": {"autoscaling": {"enabled": True}}})
