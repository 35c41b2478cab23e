"""The worker's /metrics, /healthz and /readyz (services/worker/http_endpoint.py).

Real `ferry serve decode --engine sim` processes on loopback: stand-alone (ready at once; Drain turns
it not-ready, Drain(cancel) ready again), and registered with a scheduler that starts late (not ready
until the first heartbeat). The engine-thread check is unit-tested on a stand-in servicer.
"""
from __future__ import annotations

import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import pytest

from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
from services.worker.http_endpoint import WorkerProbe, serve_http
from tests.procs import eventually, free_port, start, stop, wait_for_port

GAUGES = ("ferry_worker_requests_running", "ferry_worker_requests_waiting", "ferry_worker_kv_blocks_total",
          "ferry_worker_kv_blocks_free", "ferry_worker_draining", "ferry_worker_preemptions_total")
EVENTS = ('ferry_worker_kv_transfer_bytes_total{direction="sent"}',
          'ferry_worker_kv_transfer_bytes_total{direction="received"}',
          'ferry_worker_kv_transfer_duration_seconds_count{direction="received"}',
          "ferry_worker_prefix_cache_queries_total", "ferry_worker_prefix_cache_hits_total")
NUM_BLOCKS = 64


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def start_worker(tmp_path, *extra: str):
    grpc_port, http_port = free_port(), free_port()
    proc = start(["serve", "decode", "--engine", "sim", "--sim-num-blocks", str(NUM_BLOCKS),
                  "--port", str(grpc_port), "--metrics-port", str(http_port), *extra],
                 log=tmp_path / "worker.log")
    return proc, grpc_port, http_port


@pytest.mark.integration
def test_standalone_worker_serves_metrics_and_drain_flips_readiness(tmp_path):
    proc, grpc_port, http_port = start_worker(tmp_path, "--gpu-idle-watts", "123")
    try:
        wait_for_port(grpc_port, proc, timeout=60)
        assert get(http_port, "/healthz") == (200, "ok\n")
        assert get(http_port, "/readyz") == (200, "ok\n")
        status, text = get(http_port, "/metrics")
        assert status == 200
        values = samples(text)
        assert set(GAUGES) <= set(values), text
        assert values["ferry_worker_kv_blocks_total"] == NUM_BLOCKS
        assert values["ferry_worker_kv_blocks_free"] == NUM_BLOCKS
        assert values["ferry_worker_draining"] == 0
        assert all(values[name] == 0 for name in EVENTS), text
        assert values["ferry_worker_gpu_power_watts"] == 123          # idle: no step has run
        assert values["ferry_worker_gpu_energy_joules_total"] > 0
        assert get(http_port, "/nothing")[0] == 404

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            stub.Drain(worker_pb2.DrainRequest(), timeout=5)
            status, reason = get(http_port, "/readyz")
            assert status == 503 and "draining" in reason and reason.count("\n") == 1
            assert get(http_port, "/healthz")[0] == 200        # drained is alive, only not ready
            assert samples(get(http_port, "/metrics")[1])["ferry_worker_draining"] == 1
            stub.Drain(worker_pb2.DrainRequest(cancel=True), timeout=5)
            assert get(http_port, "/readyz") == (200, "ok\n")
            assert samples(get(http_port, "/metrics")[1])["ferry_worker_draining"] == 0
    finally:
        stop(proc)
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()[-2000:]


@pytest.mark.integration
def test_worker_is_ready_only_once_registered_with_its_scheduler(tmp_path):
    scheduler_port = free_port()
    proc, grpc_port, http_port = start_worker(tmp_path, "--scheduler-address", f"127.0.0.1:{scheduler_port}")
    scheduler = None
    try:
        wait_for_port(grpc_port, proc, timeout=60)
        status, reason = get(http_port, "/readyz")
        assert status == 503 and "not registered" in reason
        scheduler = start(["serve", "scheduler", "--port", str(scheduler_port)], log=tmp_path / "scheduler.log")
        wait_for_port(scheduler_port, scheduler, timeout=60)
        assert eventually(lambda: get(http_port, "/readyz")[0] == 200, timeout=20)
    finally:
        stop(proc)
        if scheduler is not None:
            stop(scheduler)


def test_healthz_fails_once_the_engine_thread_died():
    probe = WorkerProbe(is_standalone=True)
    server = serve_http(probe, "127.0.0.1", 0)
    try:
        port = server.server_port
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/readyz")[0] == 503                   # no servicer yet: the engine is loading
        assert samples(get(port, "/metrics")[1]) == {}
        probe.servicer = SimpleNamespace(loop=SimpleNamespace(is_alive=False, stats={}), draining=False,  # died
                                         instance_id="w")
        status, reason = get(port, "/healthz")
        assert status == 503 and "engine thread" in reason
        assert get(port, "/readyz")[0] == 503
    finally:
        server.shutdown()
