"""Hardening of everything the chart runs: every container of every workload (the chart's own: operator,
Redis; and the pods the operator builds from the chart's InferenceCluster) runs as non-root on a
read-only root filesystem without privilege escalation and with every capability dropped; what it
writes goes to an emptyDir; Secrets are mounted read-only. Also: service auth and the gateway's API
keys wired from the chart values down to the pods, and the images carry no secrets."""
from __future__ import annotations

import base64

import pytest

from operators.ferry_operator.manifests import RenderOptions, render
from operators.ferry_operator.names import ClusterRef
from operators.ferry_operator.spec import parse_spec
from services.common.service_auth import TOKEN_FILE_ENV
from services.common.service_tls import SERVER_NAME, TLS_DIR_ENV
from tests.deploy.chart import NAMESPACE, RELEASE, one, pod_specs
from tests.deploy.chart import render as helm_render
from tests.docker.test_dockerfiles import DOCKERFILES, ignore_patterns, is_ignored, parse

AUTH = ("--set", "serviceAuth.enabled=true")
KEYS = ("--set", "gateway.apiKeys.existingSecret=gateway-keys")
TLS = ("--set", "serviceTLS.enabled=true")
CONFIGS = {"default": (), "service-auth": AUTH, "api-keys": KEYS, "service-tls": (*TLS, *AUTH), "all-namespaces":
           ("--set", "operator.watchAllNamespaces=true", *AUTH), "sim-cpu":
           ("--set", "cluster.model.engine=sim", "--set", "cluster.model.device=cpu", *AUTH, *KEYS)}


def operator_pods(objects) -> list[tuple[str, dict]]:
    """The pods the operator renders for the chart's InferenceCluster."""
    cluster = one(objects, "InferenceCluster")
    ref = ClusterRef(cluster["metadata"]["name"], NAMESPACE, "uid")
    rendered = render(ref, parse_spec(cluster["spec"]), RenderOptions())
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in rendered if o["kind"] == "Deployment"]


def every_pod(*args: str) -> list[tuple[str, dict]]:
    objects = helm_render(*args)
    return pod_specs(objects) + operator_pods(objects)


def check_pod(name: str, pod: dict) -> None:
    pod_ctx = pod.get("securityContext") or {}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for c in [*pod["containers"], *(pod.get("initContainers") or [])]:
        where = f"{name}/{c['name']}"
        ctx = c.get("securityContext") or {}
        run_as_non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        assert run_as_non_root is True, f"{where}: runAsNonRoot"
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 1)) != 0, f"{where}: runs as uid 0"
        assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert "ALL" in ((ctx.get("capabilities") or {}).get("drop") or []), f"{where}: capabilities.drop ALL"
        assert not (ctx.get("capabilities") or {}).get("add"), f"{where}: adds capabilities"
        assert not ctx.get("privileged"), f"{where}: privileged"
        for mount in c.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            if not mount.get("readOnly"):
                assert "emptyDir" in volume, f"{where}: writable mount {mount['mountPath']} is not an emptyDir"
            if "secret" in volume:
                assert mount.get("readOnly") and volume["secret"].get("defaultMode", 0o644) & 0o022 == 0, where


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_container_runs_unprivileged_on_a_read_only_root(config):
    pods = every_pod(*config)
    names = {n for n, _ in pods}
    assert {f"{RELEASE}-operator", f"{RELEASE}-redis", f"{RELEASE}-gateway", f"{RELEASE}-decode"} <= names
    for name, pod in pods:
        check_pod(name, pod)


def test_the_check_catches_a_root_container():
    name, pod = every_pod()[0]
    pod["containers"][0]["securityContext"] = {**pod["containers"][0]["securityContext"], "runAsNonRoot": False}
    pod.get("securityContext", {}).pop("runAsNonRoot", None)
    with pytest.raises(AssertionError, match="runAsNonRoot"):
        check_pod(name, pod)


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def test_service_auth_off_by_default():
    objects = helm_render()
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert "serviceAuth" not in one(objects, "InferenceCluster")["spec"]
    assert "serviceTLS" not in one(objects, "InferenceCluster")["spec"]
    for name, pod in every_pod():
        assert all(TOKEN_FILE_ENV not in _env(c) and TLS_DIR_ENV not in _env(c) for c in pod["containers"]), name


def test_service_auth_generates_a_token_secret_that_the_operator_and_every_pod_mount():
    objects = helm_render(*AUTH)
    secret = one(objects, "Secret", f"{RELEASE}-service-token")
    assert len(base64.b64decode(secret["data"]["token"])) == 48
    assert one(objects, "InferenceCluster")["spec"]["serviceAuth"] == {"secretName": f"{RELEASE}-service-token",
                                                                       "secretKey": "token"}
    operator = one(objects, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]
    assert _env(operator["containers"][0])[TOKEN_FILE_ENV] == "/etc/ferry/service-token/token"
    assert {"name": "service-token", "secret": {"secretName": f"{RELEASE}-service-token", "defaultMode": 0o440,
                                                "items": [{"key": "token", "path": "token"}]}} in operator["volumes"]
    for name, pod in operator_pods(objects):
        assert _env(pod["containers"][0])[TOKEN_FILE_ENV] == "/etc/ferry/service-token/token", name


def test_an_existing_token_secret_is_used_and_none_is_generated():
    objects = helm_render(*AUTH, "--set", "serviceAuth.existingSecret=my-token", "--set", "serviceAuth.secretKey=t")
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert one(objects, "InferenceCluster")["spec"]["serviceAuth"] == {"secretName": "my-token", "secretKey": "t"}
    operator = one(objects, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]
    [volume] = [v for v in operator["volumes"] if v["name"] == "service-token"]
    assert volume["secret"]["secretName"] == "my-token" and volume["secret"]["items"] == [{"key": "t", "path": "token"}]


def test_service_tls_generates_a_ca_and_certificate_that_the_operator_and_every_pod_mount():
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from cryptography.x509.oid import ExtendedKeyUsageOID

    objects = helm_render(*TLS)
    secret = one(objects, "Secret", f"{RELEASE}-service-tls")
    assert secret["type"] == "kubernetes.io/tls"
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca, cert = (x509.load_pem_x509_certificate(files[k]) for k in ("ca.crt", "tls.crt"))
    cert.verify_directly_issued_by(ca)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == [SERVER_NAME]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert load_pem_private_key(files["tls.key"], None).public_key().public_numbers() == \
        cert.public_key().public_numbers()
    assert one(objects, "InferenceCluster")["spec"]["serviceTLS"] == {"secretName": f"{RELEASE}-service-tls"}
    operator = one(objects, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]
    assert _env(operator["containers"][0])[TLS_DIR_ENV] == "/etc/ferry/tls"
    for name, pod in [(f"{RELEASE}-operator", operator), *operator_pods(objects)]:
        assert _env(pod["containers"][0])[TLS_DIR_ENV] == "/etc/ferry/tls", name
        [volume] = [v for v in pod["volumes"] if v["name"] == "service-tls"]
        assert volume["secret"]["secretName"] == f"{RELEASE}-service-tls", name
        assert sorted(i["path"] for i in volume["secret"]["items"]) == ["ca.crt", "tls.crt", "tls.key"], name


def test_an_existing_tls_secret_is_used_and_none_is_generated():
    objects = helm_render(*TLS, "--set", "serviceTLS.existingSecret=cert-manager-made")
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert one(objects, "InferenceCluster")["spec"]["serviceTLS"] == {"secretName": "cert-manager-made"}
    for name, pod in every_pod(*TLS, "--set", "serviceTLS.existingSecret=cert-manager-made"):
        if name != f"{RELEASE}-redis":
            assert any(v.get("secret", {}).get("secretName") == "cert-manager-made" for v in pod["volumes"]), name


def test_the_gateway_api_keys_come_from_a_secret():
    objects = helm_render(*KEYS)
    spec = one(objects, "InferenceCluster")["spec"]
    assert spec["gateway"]["apiKeys"] == {"secretName": "gateway-keys", "secretKey": "api-keys.yaml"}
    assert spec["gateway"]["replicas"] == 1                      # the rest of cluster.gateway is kept
    gateway = dict(operator_pods(objects))[f"{RELEASE}-gateway"]
    assert "--api-keys-file" in gateway["containers"][0]["command"]


def test_the_images_run_as_a_non_root_user_and_name_no_secret():
    for name, path in DOCKERFILES.items():
        instructions = parse(path)
        final = max(i.stage for i in instructions)
        users = [i.args for i in instructions if i.keyword == "USER" and i.stage == final]
        assert users and users[-1].split(":")[0] not in ("0", "root"), name
        for i in instructions:
            if i.keyword in ("ENV", "ARG"):
                assert not any(word in i.args.upper() for word in ("TOKEN", "SECRET", "PASSWORD", "API_KEY")), \
                    f"{name}: {i.keyword} {i.args}"
    patterns = ignore_patterns()
    for path in (".env", "services/service-token", "operators/x.pem", "services/tls.key", "api-keys.yaml"):
        assert is_ignored(path, patterns), f"{path} would reach the image build context"
