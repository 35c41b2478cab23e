"""values.schema.json: helm rejects typos and wrong types, and its `cluster` mirrors the CRD's spec
(the API server prunes unknown fields silently, so the schema is where a typo gets caught)."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.deploy.chart import CHART, RELEASE, crd_spec_schema, helm, one, render

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
SCHEMA_ERROR = "values don't meet the specifications of the schema"


@pytest.mark.parametrize("args, where", [
    (("--set", "cluster.pools.decode.replicas=two"), "/cluster/pools/decode/replicas"),
    (("--set", "replicaCount=2"), "replicaCount"),
    (("--set", "cluster.pools.decode.replica=2"), "replica"),
    (("--set", "cluster.model.engine=vllm"), "/cluster/model/engine"),
    (("--set", "cluster.gateway.serviceType=Ingress"), "/cluster/gateway/serviceType"),
    (("--set", "image.pullPolicy=Sometimes"), "/image/pullPolicy"),
    (("--set", "operator.bindPodIP=yes"), "/operator/bindPodIP"),
    (("--set", "operator.healthPort=0"), "/operator/healthPort"),
    (("--set", "redis.external.url=localhost:6379"), "/redis/external/url"),
    (("--set", "monitoring.serviceMonitor.interval=often"), "/monitoring/serviceMonitor/interval"),
    (("--set", "cluster.name=Not_A_DNS_Label"), "/cluster/name"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_schema_rejects_bad_values(args, where):
    out = helm("template", RELEASE, str(CHART), *args, check=False)
    assert out.returncode != 0, out.stdout[:500]
    assert SCHEMA_ERROR in out.stderr and where in out.stderr, out.stderr


@pytest.mark.parametrize("value", ["", "null"])
def test_missing_model_name_is_reported(value):
    out = helm("template", RELEASE, str(CHART), "--set", f"cluster.model.name={value}", check=False)
    assert out.returncode != 0 and "/cluster/model" in out.stderr, out.stderr


def test_values_yaml_meets_its_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(values)]
    assert not errors, errors
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert SCHEMA["additionalProperties"] is False


def structure(node: dict) -> dict:
    """What must agree between the CRD and the values schema: fields, types, enums and bounds."""
    out = {k: node[k] for k in ("type", "enum", "minimum", "maximum", "minLength") if k in node}
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if "properties" in node:
        out["properties"] = {k: structure(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = structure(node["additionalProperties"])
    if "items" in node:
        out["items"] = structure(node["items"])
    return out


def test_cluster_schema_mirrors_the_crd_spec():
    crd_spec = structure(crd_spec_schema()["properties"]["spec"])
    values_cluster = structure(SCHEMA["properties"]["cluster"])
    own = values_cluster["properties"]
    assert own.pop("create") == {"type": "boolean"} and own.pop("name")["type"] == "string"
    assert values_cluster == crd_spec


def test_cluster_schema_is_strict_where_the_crd_is_structural():
    def check(node: dict, path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for k, v in node["properties"].items():
                check(v, f"{path}.{k}")
        if "items" in node:
            check(node["items"], f"{path}[]")
    check(SCHEMA["properties"]["cluster"], "cluster")


def test_integer_values_from_a_values_file_pass_the_schema(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("cluster:\n  pools:\n    decode: {replicas: 3, maxReplicas: 8}\n"
                      "  drain: {timeoutSeconds: 60}\n")
    spec = one(render("-f", str(values)), "InferenceCluster")["spec"]
    assert spec["pools"]["decode"]["replicas"] == 3 and spec["drain"]["timeoutSeconds"] == 60
