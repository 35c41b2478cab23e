"""The operator's RBAC is exactly what it calls: a table of (apiGroup, resource, verb) with the call site of
each, checked against the code (the client calls in kube.py, the kopf watches in handlers.py) and against
the Role/ClusterRoles the chart renders (no more, no less, no wildcards)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.deploy.chart import RELEASE, ROOT, find, render

KUBE = ROOT / "operators" / "ferry_operator" / "kube.py"
HANDLERS = ROOT / "operators" / "ferry_operator" / "handlers.py"
GROUP = "serving.ferry.dev"
WORKLOADS = (("apps", "deployments"), ("", "services"), ("", "configmaps"), ("policy", "poddisruptionbudgets"))

# (apiGroup, resource, verb) -> who calls it. Server-side apply is a PATCH that creates a missing object,
# so Kube.apply needs create and patch.
NAMESPACED: dict[tuple[str, str, str], str] = {
    (GROUP, "inferenceclusters", "get"): "Kube.get_cluster",
    (GROUP, "inferenceclusters", "list"): "Kube.list_clusters; kopf's watch",
    (GROUP, "inferenceclusters", "watch"): "kopf @on.create/update/resume/delete",
    (GROUP, "inferenceclusters", "patch"): "kopf's progress and diff-base annotations",
    (GROUP, "inferenceclusters/status", "patch"): "Kube.patch_status",
    **{(group, resource, "list"): "Kube.observe" for group, resource in WORKLOADS},
    **{(group, resource, "create"): "Kube.apply (server-side apply)" for group, resource in WORKLOADS},
    **{(group, resource, "patch"): "Kube.apply (server-side apply)" for group, resource in WORKLOADS},
    **{(group, resource, "delete"): "Kube.delete (prune)" for group, resource in WORKLOADS},
    ("apps", "deployments", "patch"): "Kube.apply (server-side apply); Kube.scale (a pool's replicas)",
    ("", "pods", "list"): "Kube.observe, Kube.worker_pods_on_node",
    ("", "pods", "delete"): "Kube.delete_pod",
    ("", "events", "create"): "kopf posts handler outcomes (core v1 events)",
}
CLUSTER_WIDE: dict[tuple[str, str, str], str] = {
    ("", "nodes", "list"): "kopf @on.event nodes",
    ("", "nodes", "watch"): "kopf @on.event nodes",
}
# What each DynamicClient method of kube.py needs, by verb: the table above must cover each use.
CLIENT_VERBS = {"get": {"get", "list"}, "server_side_apply": {"create", "patch"}, "delete": {"delete"},
                "patch": {"patch"}}


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
        assert not rule.get("nonResourceURLs") and not rule.get("resourceNames"), rule
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def operator_roles(objects) -> dict[str, set]:
    return {o["metadata"]["name"]: grants(o["rules"]) for o in [*find(objects, "Role"), *find(objects, "ClusterRole")]}


@pytest.mark.parametrize("watch_all", [False, True], ids=["namespace", "all-namespaces"])
def test_the_chart_grants_exactly_what_the_operator_calls(watch_all):
    objects = render("--set", f"operator.watchAllNamespaces={str(watch_all).lower()}")
    roles = operator_roles(objects)
    nodes = [name for name, g in roles.items() if name.endswith("-operator-nodes")]
    assert len(nodes) == 1 and roles.pop(nodes[0]) == set(CLUSTER_WIDE)
    [(name, granted)] = roles.items()
    kind = {o["metadata"]["name"]: o["kind"] for o in objects if o["kind"] in ("Role", "ClusterRole")}[name]
    assert kind == ("ClusterRole" if watch_all else "Role")
    assert granted == set(NAMESPACED), (f"extra: {sorted(granted - set(NAMESPACED))}, "
                                        f"missing: {sorted(set(NAMESPACED) - granted)}")


def test_without_the_node_watch_nothing_is_granted_cluster_wide():
    objects = render("--set", "operator.watchNodes=false")
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    assert operator_roles(objects) == {f"{RELEASE}-operator": set(NAMESPACED)}
    [operator] = [o for o in find(objects, "Deployment") if o["metadata"]["name"] == f"{RELEASE}-operator"]
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FERRY_OPERATOR_WATCH_NODES"] == "false"


def test_the_bindings_name_the_operators_service_account_only():
    objects = render()
    account = find(objects, "ServiceAccount")[0]["metadata"]["name"]
    bindings = [*find(objects, "RoleBinding"), *find(objects, "ClusterRoleBinding")]
    assert len(bindings) == 2
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "serving"}]


def _client_calls() -> dict[str, set[str]]:
    """Kube's methods -> the DynamicClient methods each calls (self.dyn.<x>(...))."""
    tree = ast.parse(KUBE.read_text())
    [kube] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Kube"]
    calls: dict[str, set[str]] = defaultdict(set)
    for method in (n for n in kube.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(method):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "dyn"):
                calls[method.name].add(node.func.attr)
    return calls


def test_every_client_call_of_the_operator_is_in_the_table():
    calls = _client_calls()
    used = {name for names in calls.values() for name in names}
    assert used <= set(CLIENT_VERBS), f"a new DynamicClient call {used - set(CLIENT_VERBS)}: add its verbs to the table"
    table_sites = " ".join(NAMESPACED.values())
    for method in calls:
        if method.startswith("_"):          # _list: through observe, list_clusters, worker_pods_on_node
            continue
        assert f"Kube.{method}" in table_sites, f"Kube.{method} calls the API server: name it in the table"
    verbs = {v for (_, _, v) in NAMESPACED}
    assert set().union(*(CLIENT_VERBS[c] for c in used)) <= verbs


def test_kopf_watches_only_inferenceclusters_and_nodes():
    from operators.ferry_operator.names import PLURAL

    registered = re.findall(r"kopf\.on\.(?:create|update|resume|delete|event|field|timer|daemon)\(([^)]*)\)",
                            HANDLERS.read_text())
    resources = {args.split(",")[2].strip().strip("\"'") for args in registered}
    assert resources == {"PLURAL", "nodes"} and PLURAL == "inferenceclusters"


NODE_WATCH_PROBE = """
import kopf
import operators.ferry_operator.handlers
registry = kopf._core.intents.registries.get_default_registry()
print(sorted(repr(h.selector) for h in registry._watching.get_all_handlers()))
"""


@pytest.mark.parametrize("watch_nodes", [True, False])
def test_the_node_watch_is_registered_only_when_asked_for(watch_nodes):
    env = {**os.environ, "FERRY_OPERATOR_WATCH_NODES": str(watch_nodes).lower()}
    out = subprocess.run([sys.executable, "-c", NODE_WATCH_PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert ("nodes" in out) is watch_nodes, out
