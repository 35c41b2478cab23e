"""Prometheus down (issue 10's faults): the scheduler's autoscaler reads the gateways' counters from
Prometheus (`--prometheus-url`) and, while Prometheus does not answer, scrapes the gateways itself
(`--gateway-metrics-urls`); Prometheus is read again once it is back and has caught up. A real
Prometheus (Debian's binary) is started late, stopped, and started again with an empty TSDB; no read
of the autoscaler fails meanwhile, and `ferry_scheduler_telemetry_source` follows each switch.
"""
from __future__ import annotations

import pytest

from tests.integration.prometheus import MISSING, Target, TestPrometheus, prometheus_binary
from tests.integration.stack import Stack
from tests.integration.test_faults import generate, sim_stack
from tests.integration.test_prometheus_telemetry import scheduler_metric
from tests.procs import eventually, free_port

pytestmark = pytest.mark.integration


def reads_from(stack: Stack, source: str) -> bool:
    return scheduler_metric(stack, f'ferry_scheduler_telemetry_source{{source="{source}"}}') == 1


def test_prometheus_down_the_built_in_scraper_stands_in_and_prometheus_is_used_again(tmp_path, smollm2_path):
    if prometheus_binary() is None:
        pytest.skip(MISSING)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = sim_stack("prometheus-down", tmp_path / "stack", smollm2_path, autoscale_interval_s=0.5,
                      scheduler_args=("--autoscale-window-s", "3600", "--prometheus-url", url))
    errors = "ferry_scheduler_telemetry_errors_total"
    try:
        assert eventually(lambda: reads_from(stack, "scrape"), timeout=30, interval=0.2), "no Prometheus yet"
        generate(stack, "The gateway is up.", 8)
        failed = scheduler_metric(stack, errors)     # reads before the gateway listened failed, and count
        targets = [Target(f"127.0.0.1:{stack.metrics_ports['gateway']}", {"component": "gateway"})]
        for i in range(2):                      # up, down; up (an empty TSDB), down
            with TestPrometheus(tmp_path, targets, port=port) as prometheus:
                prometheus.wait_for_targets()
                for n in range(3):
                    generate(stack, f"Prometheus up {i}.{n}", 8)
                assert eventually(lambda: reads_from(stack, "prometheus"), timeout=30, interval=0.2), \
                    "Prometheus is read again once it caught up"
            for n in range(3):
                generate(stack, f"Prometheus down {i}.{n}", 8)
            assert eventually(lambda: reads_from(stack, "scrape"), timeout=30, interval=0.2), \
                "the scraper stands in"
            assert not reads_from(stack, "prometheus")
        assert scheduler_metric(stack, errors) == failed, "no read failed: one source always answered"
        text = stack.log("scheduler").read_text()
        backs = text.count("telemetry: back to Prometheus")
        assert backs >= 2 and text.count("stands in") == backs + 1, "one log line per switch"
        assert scheduler_metric(stack, 'ferry_scheduler_autoscaler_demand_requests_per_second{pool="decode"}') > 0
    finally:
        stack.stop()
