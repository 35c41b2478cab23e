"""Monitoring in the chart: ServiceMonitor/PodMonitor/PrometheusRule only where the Prometheus Operator
API is served, alert rules that promtool accepts, dashboards whose every metric a Ferry service exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache

import pytest
import yaml

from tests.deploy.chart import CHART, MONITORING, NAMESPACE, ROOT, find, one, render

MONITOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
METRIC = re.compile(r"\bferry_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
LABELS = {"ferry_cluster"}   # the label the monitors add, not a metric


@pytest.mark.parametrize("args, present", [
    ((), False),
    (MONITORING, True),
    (("--kube-version", "1.20.0", *MONITORING), True),
    (("--set", "monitoring.assumeCRDs=true"), True),
    ((*MONITORING, "--set", "monitoring.serviceMonitor.enabled=false", "--set",
      "monitoring.podMonitor.enabled=false", "--set", "monitoring.prometheusRule.enabled=false"), False),
], ids=["no-api", "api", "api-kube-1.20", "assumed", "disabled"])
def test_monitors_only_where_the_api_is_served(args, present):
    kinds = {o["kind"] for o in render(*args)} & MONITOR_KINDS
    assert kinds == (MONITOR_KINDS if present else set())


def test_monitors_select_the_operators_workloads():
    objects = render(*MONITORING)
    cluster = {"app.kubernetes.io/name": "ferry", "serving.ferry.dev/cluster": "ferry"}
    sm = one(objects, "ServiceMonitor")["spec"]
    assert sm["selector"]["matchLabels"] == cluster
    assert sm["selector"]["matchExpressions"][0]["values"] == ["scheduler", "kvstore", "gateway"]
    assert [(e["port"], e["path"]) for e in sm["endpoints"]] == [("metrics", "/metrics"), ("http", "/metrics")]
    assert sm["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    pm = one(objects, "PodMonitor")["spec"]
    assert pm["selector"]["matchLabels"] == cluster
    assert pm["selector"]["matchExpressions"][0]["values"] == ["prefill", "decode"]
    assert [e["port"] for e in pm["podMetricsEndpoints"]] == ["metrics"]
    for endpoint in sm["endpoints"] + pm["podMetricsEndpoints"]:
        assert {r["targetLabel"] for r in endpoint["relabelings"]} == {"ferry_cluster", "component"}


@cache
def exported_metrics() -> frozenset[str]:
    """Every series name the gateway, scheduler and kvstore export, from their real collectors, plus
    any ferry_* name spelled out in services/ (workers' hand-built metric families)."""
    from services.gateway.metrics import GatewayMetrics
    from services.kvstore.server import KVStoreServicer, StoreCollector
    from services.kvstore.store import KVBlockStore
    from services.scheduler.metrics import SchedulerMetrics

    families = [*GatewayMetrics().registry.collect(), *SchedulerMetrics().registry.collect(),
                *StoreCollector(KVStoreServicer(KVBlockStore(1 << 20))).collect()]
    names = set()
    for f in families:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(f.type, ("",))
        names |= {f.name + s for s in suffixes}
    for path in (ROOT / "services").rglob("*.py"):
        names |= {m.group(0) for m in METRIC.finditer(path.read_text())}
    return frozenset(names)


def unknown_metrics(text: str) -> set[str]:
    known = exported_metrics()
    used = {m.group(0) for m in METRIC.finditer(text)} - LABELS
    return {n for n in used
            if n not in known and not any(n.endswith(s) and n[:-len(s)] in known for s in SUFFIXES)}


def rule_groups() -> dict:
    return one(render(*MONITORING), "PrometheusRule")["spec"]


def test_alert_rules_use_metrics_that_exist():
    exprs = "\n".join(r["expr"] for g in rule_groups()["groups"] for r in g["rules"])
    assert unknown_metrics(exprs) == set()
    assert "ferry_scheduler_route_decisions_total" in exprs and 'result="no_route"' in exprs
    alerts = {r["alert"] for g in rule_groups()["groups"] for r in g["rules"]}
    assert {"FerryNoDecodeInstances", "FerryRoutingFailures", "FerryTTFTAboveSLO", "FerryGatewayErrors"} <= alerts


def test_latency_alerts_follow_the_cluster_slo():
    objects = render(*MONITORING, "--set", "cluster.scheduler.slo.ttftMilliseconds=500")
    spec = one(objects, "PrometheusRule")["spec"]
    ttft = next(r for r in spec["groups"][0]["rules"] if r["alert"] == "FerryTTFTAboveSLO")
    assert ttft["expr"].rstrip().endswith("> 0.5"), ttft["expr"]


def test_promtool_accepts_the_rules(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups()))
    out = subprocess.run([promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def dashboard_configmaps(*args: str) -> list[dict]:
    return [o for o in find(render(*args), "ConfigMap") if "-dashboard-" in o["metadata"]["name"]]


def test_every_dashboard_file_ships_as_a_labelled_configmap():
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    maps = dashboard_configmaps()
    assert files and sorted(k for m in maps for k in m["data"]) == files
    assert all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in maps)
    custom = dashboard_configmaps("--set", "grafana.dashboards.label=dash,grafana.dashboards.labelValue=ferry")
    assert all(m["metadata"]["labels"]["dash"] == "ferry" and "grafana_dashboard" not in m["metadata"]["labels"]
               for m in custom)
    assert not dashboard_configmaps("--set", "grafana.dashboards.enabled=false")


@pytest.mark.parametrize("path", sorted((CHART / "dashboards").glob("*.json")), ids=lambda p: p.name)
def test_dashboard_parses_and_uses_only_exported_metrics(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "a dashboard without queries"
    assert unknown_metrics("\n".join(exprs)) == set()
    used = {m.group(0) for e in exprs for m in METRIC.finditer(e)}
    for needed in ("ferry_gateway_requests_total", "ferry_gateway_time_to_first_token_seconds_bucket",
                   "ferry_gateway_time_per_output_token_seconds_bucket", "ferry_scheduler_instances",
                   "ferry_scheduler_route_decisions_total", "ferry_scheduler_migrations_total"):
        assert needed in used, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
