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


DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))


def dashboard_exprs(path) -> list[str]:
    return [t["expr"] for p in json.loads(path.read_text())["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_parses_and_uses_only_exported_metrics(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace", "cluster"]
    exprs = dashboard_exprs(path)
    assert exprs, "a dashboard without queries"
    assert unknown_metrics("\n".join(exprs)) == set()
    assert all('namespace=~"$namespace",ferry_cluster=~"$cluster"' in e for e in exprs), "scoped to $cluster"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboards_cover_the_serving_signals():
    """Request rate, latency vs SLO, attainment, goodput, KV, prefix hits, KV transfer, migrations,
    preemptions, replicas per pool against the autoscaler, power against the budget."""
    used = {m.group(0) for path in DASHBOARDS for e in dashboard_exprs(path) for m in METRIC.finditer(e)}
    for needed in ("ferry_gateway_requests_total", "ferry_gateway_time_to_first_token_seconds_bucket",
                   "ferry_gateway_time_per_output_token_seconds_bucket", "ferry_gateway_slo_target_seconds",
                   "ferry_gateway_slo_requests_total", "ferry_scheduler_instances",
                   "ferry_scheduler_route_decisions_total", "ferry_scheduler_migrations_total",
                   "ferry_scheduler_preemption_notices_total", "ferry_worker_preemptions_total",
                   "ferry_worker_kv_blocks_free", "ferry_worker_prefix_cache_hits_total",
                   "ferry_worker_kv_transfer_bytes_total", "ferry_worker_kv_transfer_duration_seconds_bucket",
                   "ferry_scheduler_autoscaler_desired_replicas", "ferry_worker_gpu_power_watts",
                   "ferry_scheduler_power_budget_watts"):
        assert needed in used, needed


# ---- `promtool test rules`: the alerts fire on the series they are about, and only then --------------
CLUSTER = f'namespace="{NAMESPACE}",ferry_cluster="ferry"'


def alert(name: str, at: str, alerts: list[dict]) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": alerts}


def slo_series(slo: str, met_per_min: int, missed_per_min: int) -> list[dict]:
    return [{"series": f'ferry_gateway_slo_requests_total{{{CLUSTER},slo="{slo}",result="{result}"}}',
             "values": f"0+{n}x480"} for result, n in (("met", met_per_min), ("missed", missed_per_min))]


def rule_tests() -> list[dict]:
    burn_fast = {"summary": "The SLO error budget burns fast",
                 "description": "85.71% of requests missed the ttft objective over the last hour (budget 5%: 14.4x burn)."}
    burn_slow = {"summary": "The SLO error budget burns steadily",
                 "description": "50% of requests missed the ttft objective over 6 hours (budget 5%: 6x burn)."}
    kv = {"summary": "A worker's KV cache is nearly full",
          "description": "decode-0 (decode) has had 2% of its KV blocks free for 10m: requests queue or are preempted."}
    power = {"summary": "GPU power is over the cluster's budget",
             "description": "The workers draw 1.1kW, more than the power budget, for 5m."}
    return [
        {   # 6 of 7 requests miss TTFT (a 17x burn of a 5% budget): fast and slow fire, for ttft only
            "interval": "1m", "input_series": slo_series("ttft", 10, 60) + slo_series("tpot", 70, 0),
            "alert_rule_test": [
                alert("FerrySLOBurnRateFast", "1m", []),
                alert("FerrySLOBurnRateFast", "90m", [{"exp_labels": {"severity": "critical", "slo": "ttft"},
                                                       "exp_annotations": burn_fast}])]},
        {   # half miss (a 10x burn): only the slow alert
            "interval": "1m", "input_series": slo_series("ttft", 30, 30) + slo_series("tpot", 60, 0),
            "alert_rule_test": [
                alert("FerrySLOBurnRateFast", "2h", []),
                alert("FerrySLOBurnRateSlow", "2h", [{"exp_labels": {"severity": "warning", "slo": "ttft"},
                                                      "exp_annotations": burn_slow}])]},
        {   # decode-0 is 98% full, decode-1 half: only decode-0, and only after 10 minutes
            "interval": "1m", "input_series": [
                {"series": f'ferry_worker_kv_blocks_free{{{CLUSTER},pod="decode-0",component="decode"}}',
                 "values": "2x30"},
                {"series": f'ferry_worker_kv_blocks_total{{{CLUSTER},pod="decode-0",component="decode"}}',
                 "values": "100x30"},
                {"series": f'ferry_worker_kv_blocks_free{{{CLUSTER},pod="decode-1",component="decode"}}',
                 "values": "50x30"},
                {"series": f'ferry_worker_kv_blocks_total{{{CLUSTER},pod="decode-1",component="decode"}}',
                 "values": "100x30"}],
            "alert_rule_test": [
                alert("FerryKVCacheExhausted", "5m", []),
                alert("FerryKVCacheExhausted", "15m", [{"exp_labels": {"severity": "warning", "pod": "decode-0",
                                                                       "component": "decode"},
                                                        "exp_annotations": kv}])]},
        {   # 1.1 kW against a 1 kW budget fires; the same draw with no budget (0) does not
            "interval": "1m", "input_series": [
                {"series": f'ferry_worker_gpu_power_watts{{{CLUSTER},pod="decode-0"}}', "values": "600x40"},
                {"series": f'ferry_worker_gpu_power_watts{{{CLUSTER},pod="prefill-0"}}', "values": "500x40"},
                {"series": f'ferry_scheduler_power_budget_watts{{{CLUSTER}}}', "values": "1000x20 0x20"}],
            "alert_rule_test": [
                alert("FerryPowerOverBudget", "10m", [{"exp_labels": {"severity": "warning"},
                                                       "exp_annotations": power}]),
                alert("FerryPowerOverBudget", "35m", [])]},
        {   # one preempted instance reached its deadline holding requests; empty ones never fire
            "interval": "1m", "input_series": [
                {"series": f'ferry_scheduler_preemption_deadlines_total{{{CLUSTER},outcome="requests_left"}}',
                 "values": "0x5 1x40"},
                {"series": f'ferry_scheduler_preemption_deadlines_total{{{CLUSTER},outcome="empty"}}',
                 "values": "0 3x44"}],
            "alert_rule_test": [
                alert("FerryPreemptionDeadlineMissed", "4m", []),
                alert("FerryPreemptionDeadlineMissed", "8m", [{
                    "exp_labels": {"severity": "warning"},
                    "exp_annotations": {"summary": "A preempted instance still held requests at its deadline",
                                        "description": "1 preempted instance(s) in the last 15 minutes reached the "
                                                       "deadline holding requests; the gateway resumes them elsewhere "
                                                       "by recompute. Add decode capacity or lengthen the notice."}}]),
                alert("FerryPreemptionDeadlineMissed", "40m", [])]},
        {   # no healthy decode instance for 5 minutes
            "interval": "1m", "input_series": [
                {"series": f'ferry_scheduler_instances{{{CLUSTER},role="decode",healthy="true"}}', "values": "1x3 0x10"},
                {"series": f'ferry_scheduler_instances{{{CLUSTER},role="both",healthy="true"}}', "values": "0x13"}],
            "alert_rule_test": [
                alert("FerryNoDecodeInstances", "6m", []),
                alert("FerryNoDecodeInstances", "10m", [{
                    "exp_labels": {"severity": "critical"},
                    "exp_annotations": {"summary": "No healthy decode instance is registered",
                                        "description": "The scheduler has had no healthy decode (or colocated) "
                                                       "instance for 5 minutes; requests get no route."}}])]},
    ]


def test_promtool_unit_tests_of_the_alerts(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    tests = tmp_path / "rules_test.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                     "tests": rule_tests()}, width=1000))
    out = subprocess.run([promtool, "test", "rules", str(tests)], check=False, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
