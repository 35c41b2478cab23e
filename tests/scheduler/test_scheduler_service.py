"""`ferry serve scheduler` as a real process on loopback, driven over gRPC with the generated stubs.

The "instances" are registrations only (no workers run); everything else is the real scheduler, and
the persistence test uses a real redis-server.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from services.gen.ferry.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.procs import ROOT, eventually, free_port, start, start_redis, stop, wait_for_port

pytestmark = pytest.mark.integration

HEARTBEAT_TIMEOUT_S = 1.0
KEYS = [bytes([i]) * 16 for i in range(4)]


def scheduler_args(port: int, *extra: str) -> list[str]:
    return ["serve", "scheduler", "--port", str(port), "--heartbeat-interval-s", "0.1",
            "--heartbeat-timeout-s", str(HEARTBEAT_TIMEOUT_S), *extra]


class Scheduler:
    def __init__(self, port: int, proc: subprocess.Popen, metrics_port: int = -1) -> None:
        self.port, self.proc, self.metrics_port = port, proc, metrics_port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    def register(self, instance_id: str, role: int, model: str, **kw) -> scheduler_pb2.RegisterReply:
        return self.stub.Register(common_pb2.Instance(
            instance_id=instance_id, role=role, address=f"127.0.0.1:{kw.pop('port', 1)}", model=model,
            block_size=16, max_model_len=4096, **kw), timeout=5)

    def beat(self, instance_id: str, *, free: int = 100, running: int = 0, waiting: int = 0) -> bool:
        load = common_pb2.WorkerLoad(num_blocks=100, num_free_blocks=free, num_running=running,
                                     num_waiting=waiting)
        return self.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(instance_id=instance_id, load=load),
                                   timeout=5).known

    def route(self, model: str, keys=(), request_id: str = "r", **kw) -> scheduler_pb2.RouteReply:
        return self.stub.Route(scheduler_pb2.RouteRequest(
            request_id=request_id, model=model, block_keys=list(keys),
            num_prompt_tokens=kw.get("prompt", 64), max_tokens=kw.get("max_tokens", 64),
            exclude_instance_ids=kw.get("exclude", ())), timeout=5)

    def instances(self) -> dict[str, scheduler_pb2.InstanceStatus]:
        reply = self.stub.ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=5)
        return {s.instance.instance_id: s for s in reply.instances}

    def close(self) -> None:
        self.channel.close()
        stop(self.proc)


def start_scheduler(log: Path, *extra: str, metrics: bool = False) -> Scheduler:
    port = free_port()
    metrics_port = free_port() if metrics else -1
    proc = start(scheduler_args(port, "--metrics-port", str(metrics_port), *extra), log=log)
    try:
        wait_for_port(port, proc, timeout=30)
    except (RuntimeError, TimeoutError):
        stop(proc)
        raise RuntimeError(f"scheduler did not start:\n{log.read_text()}") from None
    return Scheduler(port, proc, metrics_port)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> Iterator[Scheduler]:
    s = start_scheduler(tmp_path_factory.mktemp("scheduler") / "scheduler.log", metrics=True)
    yield s
    s.close()


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_help_exits_zero():
    out = subprocess.run([sys.executable, "-m", "services.cli", "serve", "scheduler", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "--redis-url" in out.stdout and "--heartbeat-timeout-s" in out.stdout


def test_register_heartbeat_deregister(scheduler):
    reply = scheduler.register("reg-d1", common_pb2.ROLE_DECODE, "m-reg", metrics_url="http://x/metrics")
    assert reply.heartbeat_interval_s == pytest.approx(0.1)
    assert scheduler.beat("reg-d1", free=40, running=2)
    status = scheduler.instances()["reg-d1"]
    assert status.healthy and status.instance.metrics_url == "http://x/metrics"
    assert (status.load.num_free_blocks, status.load.num_running) == (40, 2)
    assert status.last_heartbeat_age_s < HEARTBEAT_TIMEOUT_S
    scheduler.stub.Deregister(scheduler_pb2.DeregisterRequest(instance_id="reg-d1"), timeout=5)
    scheduler.stub.Deregister(scheduler_pb2.DeregisterRequest(instance_id="reg-d1"), timeout=5)
    assert "reg-d1" not in scheduler.instances()
    assert scheduler.beat("reg-d1") is False           # asks the worker to register again


def test_route_least_loaded_decode_and_prefix_affinity_prefill(scheduler):
    for name, role in [("rt-p1", common_pb2.ROLE_PREFILL), ("rt-p2", common_pb2.ROLE_PREFILL),
                       ("rt-d1", common_pb2.ROLE_DECODE), ("rt-d2", common_pb2.ROLE_DECODE)]:
        scheduler.register(name, role, "m-route")

    def beat_all(p1_waiting: int, p2_waiting: int) -> None:
        scheduler.beat("rt-p1", waiting=p1_waiting)
        scheduler.beat("rt-p2", waiting=p2_waiting)
        scheduler.beat("rt-d1", free=10)
        scheduler.beat("rt-d2", free=90)

    beat_all(p1_waiting=2, p2_waiting=0)
    first = scheduler.route("m-route", KEYS, request_id="first")
    assert (first.prefill.instance_id, first.decode.instance_id) == ("rt-p2", "rt-d2")
    assert first.decode.address and first.decode.role == common_pb2.ROLE_DECODE
    beat_all(p1_waiting=0, p2_waiting=3)                # p2 is now the busier prefill, but it has the prefix
    second = scheduler.route("m-route", KEYS, request_id="second")
    assert (second.prefill.instance_id, second.decode.instance_id) == ("rt-p2", "rt-d2")
    third = scheduler.route("m-route", [bytes([9]) * 16], request_id="third")     # another prompt
    assert third.prefill.instance_id == "rt-p1"


def test_colocated_instance_does_both(scheduler):
    scheduler.register("co-b1", common_pb2.ROLE_BOTH, "m-colo")
    scheduler.register("co-b2", common_pb2.ROLE_BOTH, "m-colo")
    scheduler.beat("co-b1", running=4)
    scheduler.beat("co-b2", running=0)
    reply = scheduler.route("m-colo")
    assert reply.prefill.instance_id == reply.decode.instance_id == "co-b2"


def test_excluded_instances_are_not_routed_to_although_healthy(scheduler):
    for name, role in [("ex-p1", common_pb2.ROLE_PREFILL), ("ex-d1", common_pb2.ROLE_DECODE),
                       ("ex-d2", common_pb2.ROLE_DECODE)]:
        scheduler.register(name, role, "m-exclude")
    scheduler.beat("ex-p1")
    scheduler.beat("ex-d1", free=90)
    scheduler.beat("ex-d2", free=10)
    assert scheduler.route("m-exclude", request_id="x1").decode.instance_id == "ex-d1"
    assert scheduler.route("m-exclude", request_id="x2", exclude=["ex-d1"]).decode.instance_id == "ex-d2"
    code, details = status_of(lambda: scheduler.route("m-exclude", request_id="x3", exclude=["ex-d1", "ex-d2"]))
    assert code == grpc.StatusCode.UNAVAILABLE and "no decode instance" in details
    assert scheduler.route("m-exclude", request_id="x4").decode.instance_id == "ex-d1"   # only that call


def test_heartbeat_timeout_makes_an_instance_unhealthy(scheduler):
    scheduler.register("to-p1", common_pb2.ROLE_PREFILL, "m-timeout")
    scheduler.register("to-d1", common_pb2.ROLE_DECODE, "m-timeout")
    scheduler.beat("to-p1")
    scheduler.beat("to-d1")
    assert scheduler.route("m-timeout").decode.instance_id == "to-d1"
    assert eventually(lambda: not scheduler.instances()["to-d1"].healthy, timeout=HEARTBEAT_TIMEOUT_S + 5)
    scheduler.beat("to-p1")
    code, details = status_of(lambda: scheduler.route("m-timeout"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "no decode instance for model 'm-timeout'" in details and "healthy" in details
    assert scheduler.beat("to-d1") is True                # it is back
    assert scheduler.route("m-timeout").decode.instance_id == "to-d1"


def test_route_errors(scheduler):
    code, details = status_of(lambda: scheduler.route("no-such-model"))
    assert code == grpc.StatusCode.UNAVAILABLE and "no-such-model" in details
    code, details = status_of(lambda: scheduler.route(""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "model is empty" in details
    code, details = status_of(lambda: scheduler.route("m", [b"ab" * 16]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "block_keys[0]" in details
    code, details = status_of(lambda: scheduler.register("bad", common_pb2.ROLE_UNSPECIFIED, "m"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "role" in details
    code, _ = status_of(lambda: scheduler.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(
        instance_id="x", load=common_pb2.WorkerLoad(num_blocks=1, num_free_blocks=2)), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics(scheduler):
    scheduler.register("mx-d1", common_pb2.ROLE_DECODE, "m-metrics")
    status_of(lambda: scheduler.route("m-metrics-none"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{scheduler.metrics_port}/metrics", timeout=5).read().decode()
    assert 'ferry_scheduler_instances{healthy="true",role="decode"}' in text
    assert 'ferry_scheduler_route_decisions_total{result="no_route"}' in text
    assert "ferry_scheduler_route_duration_seconds_bucket" in text


def test_preemption_notice_drains_at_once_and_is_kept_until_the_instance_leaves(scheduler):
    def gauge(name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{scheduler.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    scheduler.register("pre-d1", common_pb2.ROLE_DECODE, "m-pre")
    scheduler.beat("pre-d1")
    notify = scheduler.stub.NotifyPreemption
    code, details = status_of(lambda: notify(scheduler_pb2.PreemptionNotice(
        instance_id="pre-d1", deadline_unix_s=float("nan")), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "deadline_unix_s" in details
    assert not scheduler.instances()["pre-d1"].load.draining             # a rejected notice changes nothing
    code, _ = status_of(lambda: notify(scheduler_pb2.PreemptionNotice(instance_id="pre-nobody"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    assert gauge("ferry_scheduler_preempting_instances") == 0

    notify(scheduler_pb2.PreemptionNotice(instance_id="pre-d1", source="gcp-metadata"), timeout=5)   # no deadline
    assert scheduler.instances()["pre-d1"].load.draining                 # not routed to any more
    code, _ = status_of(lambda: scheduler.route("m-pre"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert gauge("ferry_scheduler_preempting_instances") == 1
    scheduler.stub.Deregister(scheduler_pb2.DeregisterRequest(instance_id="pre-d1"), timeout=5)
    assert gauge("ferry_scheduler_preempting_instances") == 0


# --- Redis persistence -----------------------------------------------------------------------------

@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


def test_restarted_scheduler_knows_the_instances_from_redis(redis_url, tmp_path):
    extra = ("--redis-url", redis_url, "--redis-flush-interval-s", "0.1")
    first = start_scheduler(tmp_path / "first.log", *extra)
    try:
        first.register("rd-p1", common_pb2.ROLE_PREFILL, "m-redis", port=7001)
        first.register("rd-d1", common_pb2.ROLE_DECODE, "m-redis", port=7002)
        first.register("rd-gone", common_pb2.ROLE_DECODE, "m-redis")
        first.stub.Deregister(scheduler_pb2.DeregisterRequest(instance_id="rd-gone"), timeout=5)
        assert first.beat("rd-d1", free=33)
        store = redis.Redis.from_url(redis_url)
        assert eventually(lambda: b'"num_free_blocks": 33' in (store.hget("ferry:instances", "rd-d1") or b""),
                          timeout=10)
        store.close()
        os.killpg(first.proc.pid, signal.SIGKILL)        # a crash: nothing gets flushed on the way out
        first.proc.wait(10)
    finally:
        first.close()
    second = start_scheduler(tmp_path / "second.log", *extra)
    try:
        known = second.instances()
        assert set(known) == {"rd-p1", "rd-d1"}
        assert known["rd-p1"].instance.role == common_pb2.ROLE_PREFILL
        assert known["rd-d1"].instance.address == "127.0.0.1:7002"
        assert known["rd-d1"].load.num_free_blocks == 33
        assert second.beat("rd-d1") is True               # no re-registration needed
    finally:
        second.close()


def test_scheduler_exits_when_redis_is_unreachable(tmp_path):
    log = tmp_path / "scheduler.log"
    proc = start(scheduler_args(free_port(), "--redis-url", f"redis://127.0.0.1:{free_port()}/0"), log=log)
    try:
        assert proc.wait(30) == 1
    finally:
        stop(proc)
    assert "cannot read ferry:instances from Redis" in log.read_text()
