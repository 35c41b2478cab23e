"""The scheduler reads the gateways' counters through a real Prometheus (`--prometheus-url`, PromQL),
and what it reads equals the services' own counters.

A sim-engine stack runs with its scheduler's autoscaler pointed at a Prometheus that does not exist yet
(the port is reserved): its reads fail and are counted. Then the test Prometheus (Debian's binary)
starts there, scraping every service with the labels the chart's monitors add, and the reads succeed.
After traffic, once the stack is quiet and Prometheus has scraped it again:

  * `PrometheusSource.read()` — the very PromQL the scheduler runs, scoped by the cluster selector —
    equals `totals_of()` of the gateway's own /metrics, total by total;
  * the scheduler's window over those reads saw the traffic: its TPOT/TTFT attainment gauges equal the
    gateway's met/judged counts, and its demand gauge is above zero.
"""
from __future__ import annotations

import urllib.request

import pytest

from services.scheduler.telemetry import TOTALS, PrometheusSource, totals_of
from tests.integration.prometheus import MISSING, Target, TestPrometheus, prometheus_binary
from tests.integration.stack import MODEL, Shape, Stack, client, start_stack
from tests.procs import eventually, free_port

pytestmark = pytest.mark.integration

NAMESPACE, CLUSTER = "ferry-test", "telemetry"
SELECTOR = f'namespace="{NAMESPACE}",ferry_cluster="{CLUSTER}"'
REQUESTS = 12


def scheduler_metric(stack: Stack, sample: str) -> float:
    """One sample of the scheduler's /metrics by its exact `name{labels}` (NaN when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['scheduler']}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


def test_the_scheduler_reads_through_promql_what_the_services_count(tmp_path, smollm2_path):
    if prometheus_binary() is None:
        pytest.skip(MISSING)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shape = Shape(engine="sim", metrics=True, scheduler_args=(
        "--autoscale-interval-s", "0.5", "--autoscale-window-s", "3600",
        "--prometheus-url", url, "--prometheus-selector", SELECTOR))
    (tmp_path / "stack").mkdir()
    stack = start_stack("telemetry", tmp_path / "stack", smollm2_path, shape=shape)
    try:
        errors = "ferry_scheduler_telemetry_errors_total"
        assert eventually(lambda: scheduler_metric(stack, errors) >= 1, timeout=20), \
            "reads of a Prometheus that is not there are counted"
        assert f"autoscaling every 0.5 s from Prometheus at {url}" in stack.log("scheduler").read_text()

        targets = [Target(f"127.0.0.1:{p}", {"namespace": NAMESPACE, "ferry_cluster": CLUSTER,
                                             "component": name.split("-")[0], "pod": name})
                   for name, p in stack.metrics_ports.items()]
        with TestPrometheus(tmp_path, targets, port=port) as prometheus:
            prometheus.wait_for_targets()
            failed = scheduler_metric(stack, errors)
            source = PrometheusSource(url, SELECTOR)
            assert eventually(lambda: source.read_now()["requests"] == 0 and
                              scheduler_metric(stack, errors) == failed, timeout=10, interval=0.5)

            c = client(stack)
            for i in range(REQUESTS):
                if i % 2:
                    for _ in c.completions.create(model=MODEL, prompt=f"Question {i}?", max_tokens=8, stream=True):
                        pass
                else:
                    c.chat.completions.create(model=MODEL, max_tokens=8,
                                              messages=[{"role": "user", "content": f"Question {i}?"}])
            own = totals_of(stack.metrics())
            assert own["requests"] == REQUESTS and own["generation_tokens"] >= REQUESTS
            assert own["tpot_total"] >= REQUESTS // 2 and own["ttft_total"] == REQUESTS

            # Quiet now: after a scrape or two, PromQL gives exactly the gateway's own totals.
            assert eventually(lambda: source.read_now() == own, timeout=15, interval=0.5), \
                (source.read_now(), own)
            assert set(own) == set(TOTALS)

            # And the scheduler's window over its PromQL reads holds the whole traffic.
            def attainment(pool: str) -> float:
                return scheduler_metric(stack, f'ferry_scheduler_autoscaler_slo_attainment{{pool="{pool}"}}')

            assert eventually(lambda: attainment("decode") == pytest.approx(own["tpot_met"] / own["tpot_total"])
                              and attainment("prefill") == pytest.approx(own["ttft_met"] / own["ttft_total"]),
                              timeout=10, interval=0.5), (attainment("decode"), attainment("prefill"), own)
            assert scheduler_metric(stack, 'ferry_scheduler_autoscaler_demand_requests_per_second{pool="decode"}') > 0
            assert scheduler_metric(stack, errors) == failed, "no failed read once Prometheus is up"
    finally:
        stack.stop()
