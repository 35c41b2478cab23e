"""A real Prometheus server on loopback for tests: scrapes the targets a test gives it, answers PromQL.

    with TestPrometheus(tmp_path, [Target("127.0.0.1:9100", {"component": "scheduler"})]) as prom:
        prom.wait_for_targets()
        prom.query('sum(ferry_scheduler_instances{healthy="true"})')

It runs the `prometheus` binary (Debian's `prometheus` package, which CI installs with promtool) with a
generated config (scrape every second, one static group per target so each carries its own labels, as
the chart's ServiceMonitor/PodMonitor relabelling would add them), on a free port, with its own storage
folder. `stop` kills it by PID and removes that folder. `prometheus_binary()` is None where it is not
installed; the `test_prometheus` fixture then skips with that reason.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest

from tests.procs import free_port, stop, wait_for_port

MISSING = "the `prometheus` binary is not installed (Debian: apt-get install prometheus)"
SCRAPE_INTERVAL = "1s"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@dataclass(frozen=True, slots=True)
class Target:
    """One scrape target: `host:port`, the labels its series get, and the path of its metrics."""
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    path: str = "/metrics"


class PromQLError(RuntimeError):
    """Prometheus rejected a query (bad syntax, unknown function, evaluation error)."""


class TestPrometheus:
    """A `prometheus` process scraping `targets`; a context manager that stops it on exit."""
    __test__ = False        # not a pytest test class despite the name

    def __init__(self, log_folder: Path, targets: list[Target], *, scrape_interval: str = SCRAPE_INTERVAL,
                 port: int | None = None):
        """`port`: where to listen (default: a free one), for a service told the URL before it starts."""
        self.log_folder = Path(log_folder)
        self.port = port
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.url = ""
        self._folder: Path | None = None
        self._proc: subprocess.Popen | None = None

    # ---- life -----------------------------------------------------------------------------
    def start(self) -> Self:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError(MISSING)
        self._folder = Path(tempfile.mkdtemp(prefix="ferry-prometheus-"))
        config = self._folder / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=1))     # JSON is YAML
        port = self.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = open(self.log_folder / "prometheus.log", "ab")  # noqa: SIM115 (the child owns it)
        self._proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self._folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            cwd=self._folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            wait_for_port(port, self._proc, timeout=60)
            self._wait_ready(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill the server by PID (its process group) and remove its config and storage."""
        if self._proc is not None:
            stop(self._proc)
            self._proc = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def config(self) -> dict:
        """The scrape config: one job, one static group per target (its labels attached)."""
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [{
                "job_name": "ferry",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [t.address], "labels": {**t.labels, "__metrics_path__": t.path}}
                                   for t in self.targets],
            }],
        }

    # ---- the HTTP API ---------------------------------------------------------------------
    def api(self, path: str, **params: str) -> dict | list:
        """GET /api/v1/<path>; the `data` of a success, PromQLError with Prometheus' message otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:         # 400/422/503 carry a JSON error body
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')} ({params})")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """An instant query: the result list (vector samples; a scalar comes back as one sample)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, promql: str) -> float | None:
        """The single value of a query that yields at most one sample (None when it yields none)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise ValueError(f"{promql} yields {len(result)} samples")
        return float(result[0]["value"][1])

    def series_names(self) -> set[str]:
        """Every metric name Prometheus has stored (what the targets exported)."""
        return set(self.api("label/__name__/values"))

    def active_targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def wait_for_targets(self, timeout: float = 30.0) -> None:
        """Until every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.active_targets()
            if len(targets) == len(self.targets) and all(t["health"] == "up" for t in targets):
                return
            if time.monotonic() > deadline:
                states = {t["scrapeUrl"]: (t["health"], t.get("lastError")) for t in targets}
                raise TimeoutError(f"targets not all up after {timeout} s: {states}")
            time.sleep(0.2)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}; see "
                                   f"{self.log_folder / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}/-/ready is not ready after {timeout} s")


@pytest.fixture
def test_prometheus(tmp_path):
    """A factory: `test_prometheus([Target(...), ...])` starts a server (stopped after the test); skips
    the test where the binary is missing. Import it into a test module to use it."""
    if prometheus_binary() is None:
        pytest.skip(MISSING)
    servers: list[TestPrometheus] = []

    def start(targets: list[Target], **kwargs) -> TestPrometheus:
        server = TestPrometheus(tmp_path, targets, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
