"""The worker's HTTP endpoint for Prometheus and Kubernetes probes (`--metrics-port`, 9090 in a pod).

    /metrics   Prometheus text, read from the engine loop's stats at scrape time (no polling thread):
                 ferry_worker_requests_running    gauge   requests decoding or prefilling (suspended too)
                 ferry_worker_requests_waiting    gauge   requests queued for their first step
                 ferry_worker_kv_blocks_total     gauge   KV blocks of the pool
                 ferry_worker_kv_blocks_free      gauge   KV blocks free now
                 ferry_worker_draining            gauge   1 while drained (Drain RPC), else 0
                 ferry_worker_preemptions_total   counter requests preempted for KV room
                 ferry_worker_kv_transfer_*, ferry_worker_prefix_cache_*   counted as they happen (metrics.py)
                 ferry_worker_gpu_power_watts          gauge    GPU power (NVML, or modelled: power.py)
                 ferry_worker_gpu_energy_joules_total  counter  GPU energy since the worker started
                 ferry_worker_gpu_power_limit_watts    gauge    the power limit in force
                 ferry_worker_gpu_sm_clock_hertz       gauge    SM clock now
                 ferry_worker_gpu_sm_clock_cap_hertz   gauge    the locked maximum SM clock (0: none)
                 ferry_worker_preemption_*   the preemption watcher's, while it runs (metrics.py)
    /healthz   200 while the process serves and its engine thread lives; 503 once that thread died.
    /readyz    200 when the gRPC server is up, the worker is registered with its scheduler (or runs
               stand-alone) and it is not draining; else 503 and the reason on one line. A drained
               worker turns not-ready, which is what makes the ReplicaSet remove its pod first.

The server is stdlib `http.server` on a daemon thread: handlers only read plain attributes that the
event loop replaces whole (a dict, a bool), so they need no lock and never wait on the event loop.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.gen.ferry.v1 import common_pb2

# A registration whose last heartbeat is older than this many seconds (or 3 heartbeat intervals, if
# the scheduler asks for slower ones) no longer counts: the scheduler's default heartbeat timeout,
# after which it stops routing here.
REGISTRATION_STALE_S = 3.0


class WorkerProbe:
    """What the endpoint reports, set by `serve()` as the worker comes up and goes down."""

    def __init__(self, *, is_standalone: bool) -> None:
        self.is_standalone = is_standalone
        self.servicer = None            # the WorkerServicer, once the gRPC server is up
        self.is_stopping = False
        self.power = None               # the GPU power backend (power.py), where the worker has one
        self.preemption = None          # the preemption watcher's PreemptionMetrics, where it runs
        self._beats: tuple[float, float] | None = None    # monotonic times of the last two heartbeats

    def heartbeat_load(self, load: Callable[[], common_pb2.WorkerLoad]) -> Callable[[], common_pb2.WorkerLoad]:
        """Wrap the load callable given to `keep_registered`: it calls it only right before a
        Heartbeat of a registered instance, so each call says "registered, as of now"."""
        def beat() -> common_pb2.WorkerLoad:
            now = time.monotonic()
            self._beats = (self._beats[1] if self._beats else now, now)
            return load()
        return beat

    def unhealthy_reason(self) -> str | None:
        loop = self.servicer.loop if self.servicer is not None else None
        # EngineLoop keeps its thread private; a dead one means no step will ever run again.
        if loop is not None and not loop.is_alive and not self.is_stopping:
            return "the engine thread has died"
        return None

    def unready_reason(self) -> str | None:
        if self.is_stopping:
            return "the worker is shutting down"
        if self.servicer is None:
            return "the engine is loading; the gRPC server is not up yet"
        if (reason := self.unhealthy_reason()) is not None:
            return reason
        if self.servicer.draining:
            return f"worker {self.servicer.instance_id} is draining"
        if not self.is_standalone and not self._is_registered():
            return "not registered with the scheduler (no recent heartbeat)"
        return None

    def _is_registered(self) -> bool:
        if self._beats is None:
            return False
        previous, last = self._beats
        return time.monotonic() - last <= max(REGISTRATION_STALE_S, 3 * (last - previous))


class WorkerCollector:
    """Builds the ferry_worker_* samples from the servicer at each scrape."""

    def __init__(self, probe: WorkerProbe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        servicer = self.probe.servicer
        if servicer is None:
            return
        stats = servicer.loop.stats       # replaced whole after each step: a consistent snapshot
        for name, key, doc in (
                ("ferry_worker_requests_running", "num_running", "Requests running (prefill or decode)"),
                ("ferry_worker_requests_waiting", "num_waiting", "Requests waiting for their first step"),
                ("ferry_worker_kv_blocks_total", "num_blocks", "KV blocks in the pool"),
                ("ferry_worker_kv_blocks_free", "num_free_blocks", "KV blocks free")):
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        yield GaugeMetricFamily("ferry_worker_draining", "1 while the worker is draining",
                                value=int(servicer.draining))
        yield CounterMetricFamily("ferry_worker_preemptions", "Requests preempted for KV room",
                                  value=stats.get("num_preemptions", 0))
        yield from servicer.metrics.collect()
        if self.probe.preemption is not None:
            yield from self.probe.preemption.collect()
        if self.probe.power is not None:
            gpu = self.probe.power.read()
            yield GaugeMetricFamily("ferry_worker_gpu_power_watts", "GPU power draw", value=gpu.power_watts)
            yield CounterMetricFamily("ferry_worker_gpu_energy_joules", "GPU energy used since the worker started",
                                      value=gpu.energy_joules)
            yield GaugeMetricFamily("ferry_worker_gpu_power_limit_watts", "GPU power limit in force",
                                    value=gpu.power_limit_watts)
            yield GaugeMetricFamily("ferry_worker_gpu_sm_clock_hertz", "GPU SM clock now",
                                    value=gpu.clock_mhz * 1e6)
            yield GaugeMetricFamily("ferry_worker_gpu_sm_clock_cap_hertz", "Locked maximum SM clock of the "
                                    "GPU (0: none)", value=(gpu.clock_cap_mhz or 0.0) * 1e6)


def serve_http(probe: WorkerProbe, host: str, port: int) -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread; `.server_port` is the bound port, `.shutdown()` stops it."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(probe))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                reason = probe.unhealthy_reason() if path == "/healthz" else probe.unready_reason()
                self._reply(503 if reason else 200, f"{reason or 'ok'}\n".encode())
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:     # probes every few seconds: keep them out of the log
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise OSError(f"cannot serve the worker's HTTP endpoint on {host}:{port}: {e}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http-endpoint", daemon=True).start()
    return server
