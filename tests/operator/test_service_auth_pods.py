"""spec.serviceAuth and spec.gateway.apiKeys: the Secrets the operator mounts (read-only, projected keys),
the env var and flag that point the processes at them, and nothing at all when they are not set."""
from __future__ import annotations

import pytest

from operators.ferry_operator.manifests import RenderOptions, key_of, render
from operators.ferry_operator.names import ClusterRef
from operators.ferry_operator.spec import SecretFileSpec, parse_spec
from services.common.service_auth import TOKEN_FILE_ENV
from services.common.service_tls import FILES, TLS_DIR_ENV

REF = ClusterRef("demo", "serving", "uid-7")
MODEL = {"name": "llama", "volume": {"persistentVolumeClaim": {"claimName": "m"}}}
COMPONENTS = ("scheduler", "kvstore", "gateway", "prefill", "decode")
AUTH = {"serviceAuth": {"secretName": "ferry-service-token"}}
KEYS = {"gateway": {"apiKeys": {"secretName": "gateway-keys", "secretKey": "keys.yaml"}}}


def rendered(spec: dict) -> dict[tuple[str, str], dict]:
    return {key_of(o): o for o in render(REF, parse_spec({"model": MODEL, **spec}), RenderOptions())}


def pods(spec: dict) -> dict[str, dict]:
    objects = rendered(spec)
    return {c: objects[("Deployment", f"demo-{c}")]["spec"]["template"]["spec"] for c in COMPONENTS}


def volume(pod: dict, name: str) -> dict | None:
    return next((v for v in pod["volumes"] if v["name"] == name), None)


def test_every_pod_mounts_the_service_token_read_only_and_points_the_env_var_at_it():
    for component, pod in pods(AUTH).items():
        [c] = pod["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env[TOKEN_FILE_ENV] == "/etc/ferry/service-token/token", component
        mount = next(m for m in c["volumeMounts"] if m["name"] == "service-token")
        assert mount == {"name": "service-token", "mountPath": "/etc/ferry/service-token", "readOnly": True}
        assert volume(pod, "service-token") == {"name": "service-token", "secret": {
            "secretName": "ferry-service-token", "defaultMode": 0o440, "items": [{"key": "token", "path": "token"}]}}


def test_the_gateway_alone_gets_the_api_keys_file():
    for component, pod in pods(KEYS).items():
        [c] = pod["containers"]
        if component == "gateway":
            assert c["command"] == ["ferry", "serve", "gateway", "--api-keys-file", "/etc/ferry/api-keys/api-keys.yaml"]
            assert {"name": "api-keys", "mountPath": "/etc/ferry/api-keys", "readOnly": True} in c["volumeMounts"]
            assert volume(pod, "api-keys")["secret"]["items"] == [{"key": "keys.yaml", "path": "api-keys.yaml"}]
        else:
            assert "--api-keys-file" not in c["command"] and volume(pod, "api-keys") is None
        assert volume(pod, "service-token") is None           # independent of serviceAuth


def test_every_pod_mounts_the_tls_secret_read_only_and_points_the_env_var_at_it():
    for component, pod in pods({"serviceTLS": {"secretName": "ferry-tls"}}).items():
        [c] = pod["containers"]
        assert {e["name"]: e.get("value") for e in c["env"]}[TLS_DIR_ENV] == "/etc/ferry/tls", component
        assert {"name": "service-tls", "mountPath": "/etc/ferry/tls", "readOnly": True} in c["volumeMounts"]
        assert volume(pod, "service-tls") == {"name": "service-tls", "secret": {
            "secretName": "ferry-tls", "defaultMode": 0o440,
            "items": [{"key": name, "path": name} for name in FILES]}}, component


def config(spec: dict) -> dict[str, str]:
    return rendered(spec)[("ConfigMap", "demo-config")]["data"]


def test_gateway_replicas_count_rate_limits_in_the_schedulers_redis():
    redis = {"scheduler": {"redisURL": "redis://demo-redis.serving.svc:6379/0"}}
    assert config({**KEYS, **redis})["FERRY_GATEWAY_RATE_LIMIT_REDIS_URL"] == "redis://demo-redis.serving.svc:6379/0"
    assert "FERRY_GATEWAY_RATE_LIMIT_REDIS_URL" not in config(redis)        # no keys, no limits to count
    assert "FERRY_GATEWAY_RATE_LIMIT_REDIS_URL" not in config(KEYS)         # no Redis: each replica alone


def test_without_them_the_pods_are_what_they_were():
    plain = pods({})
    assert pods({"serviceAuth": {"secretName": ""}, "serviceTLS": {}, "gateway": {"apiKeys": {}}}) == plain
    for pod in plain.values():
        [c] = pod["containers"]
        assert TOKEN_FILE_ENV not in {e["name"] for e in c["env"]}
        assert {v["name"] for v in pod["volumes"]} <= {"tmp", "model"}


def test_the_secret_volumes_keep_the_root_filesystem_read_only():
    for pod in pods({**AUTH, **KEYS}).values():
        [c] = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] in ("service-token", "api-keys"))


@pytest.mark.parametrize("spec, parsed", [
    ({}, SecretFileSpec("", "token")),
    ({"serviceAuth": {"secretName": "s"}}, SecretFileSpec("s", "token")),
    ({"serviceAuth": {"secretName": "s.v1", "secretKey": "tok_en"}}, SecretFileSpec("s.v1", "tok_en")),
])
def test_service_auth_spec(spec, parsed):
    assert parse_spec({"model": MODEL, **spec}).service_auth == parsed


@pytest.mark.parametrize("spec, message", [
    ({"serviceAuth": {"secretName": "Bad_Name"}}, "spec.serviceAuth.secretName"),
    ({"serviceAuth": {"secretName": "s", "secretKey": "a/b"}}, "spec.serviceAuth.secretKey"),
    ({"gateway": {"apiKeys": {"secretName": "s", "secretKey": "../x y"}}}, "spec.gateway.apiKeys.secretKey"),
    ({"serviceAuth": {"secretName": 3}}, "spec.serviceAuth.secretName"),
])
def test_a_wrong_secret_reference_is_refused_naming_the_field(spec, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        parse_spec({"model": MODEL, **spec})
