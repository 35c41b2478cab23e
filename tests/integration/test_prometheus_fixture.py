"""The test Prometheus (prometheus.py) scrapes a real kvstore's /metrics and answers PromQL."""
from __future__ import annotations

import pytest

from tests.integration.prometheus import PromQLError, Target, test_prometheus  # noqa: F401 (fixture)
from tests.procs import eventually, free_port, start, stop, wait_for_port


def test_scrapes_a_service_and_answers_queries(tmp_path, test_prometheus):  # noqa: F811
    port, metrics_port = free_port(), free_port()
    kvstore = start(["serve", "kvstore", "--port", str(port), "--metrics-port", str(metrics_port),
                     "--capacity-gb", "0.01"], log=tmp_path / "kvstore.log")
    try:
        wait_for_port(metrics_port, kvstore, timeout=60)
        prom = test_prometheus([Target(f"127.0.0.1:{metrics_port}", {"component": "kvstore", "pod": "kv-0"})])
        prom.wait_for_targets()
        assert eventually(lambda: prom.value('sum(ferry_kvstore_capacity_bytes{component="kvstore"})'),
                          timeout=15, interval=0.2)
        assert prom.value('ferry_kvstore_capacity_bytes{pod="kv-0"}') == pytest.approx(0.01e9, rel=0.1)
        assert "ferry_kvstore_capacity_bytes" in prom.series_names()
        assert prom.query("1 + 1")[0]["value"][1] == "2"
        with pytest.raises(PromQLError, match="bad_data"):
            prom.query("sum(")
    finally:
        stop(kvstore)
