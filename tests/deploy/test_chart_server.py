"""The rendered chart against a real API server (`kube_cluster`): server-side dry-run apply, so the
API server's own validation (schemas, RBAC escalation checks, the CRD's openAPIV3Schema) sees it."""
from __future__ import annotations

import json

import pytest

from tests.deploy.chart import CHART, CRD_FILE, RELEASE, helm

pytestmark = pytest.mark.e2e
CRD_NAME = "inferenceclusters.serving.ferry.dev"


@pytest.fixture(scope="module")
def server_version(kube_cluster) -> str:
    """The server's version; the IC's dry-run needs its CRD installed for real first (idempotent)."""
    kube_cluster.kubectl("apply", "-f", str(CRD_FILE))
    kube_cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]


@pytest.mark.parametrize("args", [(), ("--set", "operator.watchAllNamespaces=true"),
                                  ("--set", "redis.external.url=redis://redis:6379/0,operator.bindPodIP=true")],
                         ids=["defaults", "watch-all-namespaces", "external-redis-bind-pod-ip"])
def test_rendered_chart_passes_server_side_dry_run(kube_cluster, server_version, args):
    ns = kube_cluster.create_namespace("chart")
    text = helm("template", RELEASE, str(CHART), "-n", ns, "--kube-version", server_version.lstrip("v").split("-")[0],
                *args).stdout
    out = kube_cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=text)
    applied = [line for line in out.stdout.splitlines() if "(server dry run)" in line]
    assert any(line.startswith("inferencecluster.serving.ferry.dev/") for line in applied), out.stdout
    assert any(line.startswith("deployment.apps/") for line in applied), out.stdout
    assert len(applied) == text.count("\nkind: "), out.stdout
