"""The chart's dashboards and alerts against a real Prometheus scraping a real stack.

A sim-engine stack (1 prefill + 1 decode worker, kvstore, scheduler with its autoscaler and a power
budget, gateway) serves some requests while the test Prometheus (prometheus.py) scrapes every service's
/metrics each second, with the labels the chart's ServiceMonitor/PodMonitor would add (namespace,
ferry_cluster, component, pod). Then:

  * every panel query of every dashboard and every alert expression of the rendered PrometheusRule
    runs without error (Grafana's $namespace, $cluster and $__rate_interval filled in);
  * every metric any of them names is exported by some running service (its /metrics declares it),
    and docs/metrics.md documents every metric the services export;
  * the panels the issue asks for (request rate, latency vs SLO, attainment, goodput, KV use, prefix
    hits, KV transfer, replicas vs the autoscaler, power vs budget) show data.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.chart import CHART, MONITORING, NAMESPACE, one, render
from tests.integration.prometheus import MISSING, Target, TestPrometheus, prometheus_binary
from tests.integration.stack import MODEL, Shape, Stack, client, start_stack
from tests.procs import ROOT, eventually

pytestmark = pytest.mark.integration

CLUSTER = "ferry"                    # the release's cluster name (tests/deploy/chart.py renders "ferry")
RATE_INTERVAL = "1m"                 # $__rate_interval: long enough that the traffic stays in the window
POWER_BUDGET_W = 5000.0
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
SYNTHETIC = {"up"}                   # series Prometheus itself makes for each target
# A metric name: an identifier before a selector, or any ferry_* identifier that is not a label matcher.
SELECTED = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
FERRY_NAME = re.compile(r"\bferry_[a-z0-9_]+\b(?!\s*(?:=|!=|=~|!~))")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
LABEL_VALUES = re.compile(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def component(process: str) -> str:
    """The `component` label of a stack process: its pool for workers ("decode-1" -> "decode")."""
    return process.split("-")[0]


def grafana(expr: str) -> str:
    """A panel query as Grafana sends it for this stack's namespace and cluster."""
    return (expr.replace("$namespace", NAMESPACE).replace("$cluster", CLUSTER)
            .replace("$__rate_interval", RATE_INTERVAL))


def metric_names(promql: str) -> set[str]:
    promql = GROUPING.sub("", promql)          # label names only there
    return set(SELECTED.findall(promql)) | set(FERRY_NAME.findall(promql))


def panel_queries() -> list[tuple[str, str]]:
    """(dashboard / panel title, query) of every panel target of every dashboard."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        out += [(f"{board['title']} / {p['title']}", grafana(t["expr"]))
                for p in board["panels"] for t in p.get("targets", [])]
    return out


def alert_queries() -> list[tuple[str, str]]:
    spec = one(render(*MONITORING), "PrometheusRule")["spec"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in spec["groups"] for r in g["rules"]]


def variable_queries() -> list[tuple[str, str]]:
    """The template variables' label_values(metric{…}, label) as the PromQL behind them."""
    out = []
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] == "query":
                metric, matchers, label = LABEL_VALUES.fullmatch(var["definition"]).groups()
                out.append((f"{path.name} ${var['name']}", grafana(f"count by ({label}) ({metric}{matchers or ''})")))
    return out


def families(stack: Stack) -> dict[str, str]:
    """name -> type of every metric family the stack's services declare on /metrics (a labelled metric
    with no sample yet too)."""
    out = {}
    for port in stack.metrics_ports.values():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            out |= {f.name: f.type for f in text_string_to_metric_families(r.read().decode())}
    return out


def exported(stack: Stack) -> set[str]:
    """Every series name the services' /metrics declare."""
    return {name + s for name, kind in families(stack).items() for s in SUFFIXES.get(kind, ("",))}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smollm2_path):
    shape = Shape(engine="sim", metrics=True, autoscale_interval_s=1.0,
                  scheduler_args=("--power-budget-watts", str(POWER_BUDGET_W), "--autoscale-window-s", "10"))
    stack = start_stack("dashboards", tmp_path_factory.mktemp("dashboards"), smollm2_path, shape=shape)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory):
    if prometheus_binary() is None:
        pytest.skip(MISSING)
    targets = [Target(f"127.0.0.1:{port}", {"namespace": NAMESPACE, "ferry_cluster": CLUSTER,
                                             "component": component(name), "pod": name})
               for name, port in stack.metrics_ports.items()]
    with TestPrometheus(tmp_path_factory.mktemp("prometheus"), targets) as server:
        server.wait_for_targets()
        yield server


@pytest.fixture(scope="module")
def traffic(stack: Stack, prometheus: TestPrometheus) -> int:
    """Requests through the gateway, some sharing a long prefix (prefix hits); returns how many. Waits
    until Prometheus has their counts and a few more scrapes (rates need two samples in the window)."""
    shared = "You are a helpful assistant. " * 40
    prompts = [shared + f"Question {i}?" for i in range(12)] + [f"Unrelated prompt {i}" for i in range(4)]
    c = client(stack)

    def send(i_prompt: tuple[int, str]) -> None:
        i, prompt = i_prompt
        if i % 3 == 0:
            for _ in c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stream=True, seed=i):
                pass
        else:
            c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, seed=i)

    # One request first: its labelled series (requests by status) must be in Prometheus before the rest
    # arrive, or a counter first seen at its final value has no increase to rate.
    send((1, prompts[1]))
    assert eventually(lambda: prometheus.query("ferry_gateway_requests_total"), timeout=30, interval=0.5)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, [(i, p) for i, p in enumerate(prompts) if i != 1]))
    counted = f'sum(ferry_gateway_slo_requests_total{{slo="all"}}) >= {len(prompts)}'
    assert eventually(lambda: prometheus.query(counted), timeout=30, interval=0.5), "Prometheus missed them"
    assert eventually(lambda: prometheus.query("max(ferry_scheduler_autoscaler_desired_replicas) >= 0"),
                      timeout=30, interval=0.5), "the autoscaler made no recommendation"
    time.sleep(3)
    return len(prompts)


def test_every_panel_and_alert_query_runs(prometheus: TestPrometheus, traffic):
    errors = {}
    for name, query in panel_queries() + alert_queries() + variable_queries():
        try:
            prometheus.query(query)
        except Exception as e:  # noqa: BLE001 (collected: one report of every failing query)
            errors[name] = f"{query}\n    {e}"
    assert not errors, "\n".join(f"{k}: {v}" for k, v in errors.items())


def test_every_metric_used_is_exported(stack: Stack, traffic):
    queries = panel_queries() + alert_queries() + variable_queries()
    used = set().union(*(metric_names(q) for _, q in queries)) - SYNTHETIC
    assert any(n.startswith("ferry_worker_") for n in used) and "ferry_scheduler_instances" in used
    missing = sorted(used - exported(stack))
    assert not missing, f"named in dashboards or alerts but exported by no service: {missing}"


def test_docs_list_every_exported_metric(stack: Stack, traffic):
    """docs/metrics.md has a row for every metric a running service exports (sim workers: power too)."""
    table_rows = re.compile(r"^\| `(ferry_[a-z0-9_]+)`", re.MULTILINE)
    documented = set(table_rows.findall((ROOT / "docs" / "metrics.md").read_text()))
    names = {name + ("_total" if kind == "counter" else "") for name, kind in families(stack).items()
             if not name.endswith("_created")}         # the client library's creation timestamps
    assert {"ferry_worker_gpu_power_watts", "ferry_gateway_slo_requests_total"} <= names
    assert sorted(names - documented) == []


@pytest.mark.parametrize("title, check", [
    ("Ferry / Overview / Request rate", lambda v: v > 0),
    ("Ferry / Overview / Goodput", lambda v: v > 0),
    ("Ferry / Overview / SLO attainment", lambda v: 0 < v <= 1),
    ("Ferry / Overview / TTFT p99", lambda v: v > 0),
    ("Ferry / Overview / KV cache use", lambda v: 0 <= v < 1),
    ("Ferry / Overview / Power", lambda v: v >= 200),               # two workers, 100 W idle each
    ("Ferry / Overview / Healthy decode instances", lambda v: v == 1),
])
def test_overview_stats_show_the_stack(prometheus: TestPrometheus, traffic, title, check):
    query = dict(panel_queries())[title]
    value = prometheus.value(query)
    assert value is not None and check(value), f"{title}: {value} from {query}"


def series(prometheus: TestPrometheus, title: str) -> list[list[dict]]:
    """The results of every query of one panel."""
    return [prometheus.query(q) for name, q in panel_queries() if name == title]


def test_latency_panels_draw_the_slo_line(prometheus: TestPrometheus, traffic):
    for title, target in (("Time to first token", 2.0), ("Time per output token", 0.1)):
        p50, p99, slo = series(prometheus, f"Ferry / Overview / {title}")
        assert p50 and p99, title
        assert float(slo[0]["value"][1]) == target


def test_replicas_panel_compares_pools_with_the_autoscaler(prometheus: TestPrometheus, traffic):
    actual, desired, target = series(prometheus, "Ferry / Overview / Replicas per pool")
    assert {r["metric"]["role"]: float(r["value"][1]) for r in actual}.items() >= {("prefill", 1.0), ("decode", 1.0)}
    assert {r["metric"]["pool"] for r in desired} == {r["metric"]["pool"] for r in target} == {"prefill", "decode"}


def test_power_panel_shows_the_budget(prometheus: TestPrometheus, traffic):
    power, budget = series(prometheus, "Ferry / Overview / Power vs budget")
    assert float(budget[0]["value"][1]) == POWER_BUDGET_W
    assert 200 <= float(power[0]["value"][1]) <= 1400         # two modelled H100s


def test_worker_panels_show_kv_transfer_and_prefix_hits(prometheus: TestPrometheus, traffic):
    (throughput,) = series(prometheus, "Ferry / Workers and KV / KV transfer throughput")
    by_direction = {r["metric"]["direction"]: float(r["value"][1]) for r in throughput}
    assert set(by_direction) == {"sent", "received"}
    totals = {d: prometheus.value(f'sum(ferry_worker_kv_transfer_bytes_total{{direction="{d}"}})')
              for d in ("sent", "received")}
    assert totals["sent"] == totals["received"] > 0, totals     # every hand-off, counted at both ends
    assert prometheus.value('sum(ferry_worker_kv_transfer_duration_seconds_count{direction="received"})') \
        == traffic
    hits = prometheus.value('sum(ferry_worker_prefix_cache_hits_total{component="prefill"})')
    queries = prometheus.value('sum(ferry_worker_prefix_cache_queries_total{component="prefill"})')
    assert 0 < hits < queries, (hits, queries)                    # the shared prefix hit, the rest did not


def test_the_test_scrape_labels_match_the_monitors():
    """The labels the test gives each target are the ones the chart's monitors add (plus the pod and
    namespace the Prometheus Operator adds to every target)."""
    objects = render(*MONITORING)
    relabelled = {r["targetLabel"] for o in (one(objects, "ServiceMonitor")["spec"]["endpoints"][0],
                                             one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"][0])
                  for r in o["relabelings"]}
    assert relabelled | {"namespace", "pod"} == {"namespace", "ferry_cluster", "component", "pod"}
