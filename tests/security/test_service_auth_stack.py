"""Service authentication between real processes on loopback: a scheduler, a kvstore, a sim-engine worker
and a gateway, all given FERRY_SERVICE_TOKEN_FILE. With the token every hop works (registration, heartbeats,
Route, Prefill, the token sink: a completion comes back); without it, or with a wrong one, the scheduler
and the worker answer UNAUTHENTICATED, and a worker without the token cannot register."""
from __future__ import annotations

import time

import grpc
import openai
import pytest

from services.common import service_auth
from services.gen.ferry.v1 import (
    kvstore_pb2,
    kvstore_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.integration.stack import MODEL
from tests.procs import eventually, free_port, start, stop, wait_for_port

pytestmark = pytest.mark.integration

TOKEN = "integration-token-0123456789abcdef"


class Cluster:
    def __init__(self, folder, model) -> None:
        self.folder, self.model, self.procs = folder, model, {}
        self.token_file = folder / "service-token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)

    def start(self, name: str, args: list[str], token_file: str | None = None) -> None:
        env = {service_auth.TOKEN_FILE_ENV: str(self.token_file) if token_file is None else token_file}
        self.procs[name] = start(args, log=self.folder / f"{name}.log", env=env)

    def worker_args(self, port: int) -> list[str]:
        return ["serve", "decode", "--role", "both", "--engine", "sim", "--sim-profile", "llama3-8b-h100",
                "--model", str(self.model), "--scheduler-address", self.scheduler, "--port", str(port),
                "--kvstore-address", self.kvstore,
                "--kv-cache-memory-gb", "0.25", "--cpu-threads", "1"]

    def tails(self) -> str:
        return "\n".join(f"---- {n}\n" + (self.folder / f"{n}.log").read_text(errors="replace")[-2000:]
                         for n in self.procs)


def channel(address: str, token: str | None) -> grpc.Channel:
    plain = grpc.insecure_channel(address)
    return grpc.intercept_channel(plain, service_auth.SyncTokenClientInterceptor(token)) if token else plain


def instances(address: str, token: str | None = TOKEN) -> list[scheduler_pb2.InstanceStatus]:
    with channel(address, token) as ch:
        return list(scheduler_pb2_grpc.SchedulerStub(ch).ListInstances(
            scheduler_pb2.ListInstancesRequest(), timeout=5).instances)


def kvstore_stats(address: str, token: str | None = TOKEN) -> kvstore_pb2.KVStoreStats:
    with channel(address, token) as ch:
        return kvstore_pb2_grpc.KVStoreStub(ch).Stats(kvstore_pb2.KVStoreStatsRequest(), timeout=5)


def worker_stats(address: str, token: str | None = TOKEN) -> worker_pb2.WorkerStats:
    with channel(address, token) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path):
    c = Cluster(tmp_path_factory.mktemp("service-auth"), smollm2_path)
    try:
        scheduler_port, worker_port, http_port = free_port(), free_port(), free_port()
        c.scheduler = f"127.0.0.1:{scheduler_port}"
        c.worker = f"127.0.0.1:{worker_port}"
        c.url = f"http://127.0.0.1:{http_port}"
        kvstore_port = free_port()
        c.kvstore = f"127.0.0.1:{kvstore_port}"
        c.start("scheduler", ["serve", "scheduler", "--port", str(scheduler_port), "--heartbeat-interval-s", "0.2"])
        c.start("kvstore", ["serve", "kvstore", "--port", str(kvstore_port), "--capacity-gb", "0.1"])
        wait_for_port(scheduler_port, c.procs["scheduler"], timeout=60)
        wait_for_port(kvstore_port, c.procs["kvstore"], timeout=60)
        c.start("worker", c.worker_args(worker_port))
        wait_for_port(worker_port, c.procs["worker"], timeout=120)
        c.start("gateway", ["serve", "gateway", "--model", str(smollm2_path), "--port", str(http_port),
                            "--sink-port", str(free_port()), "--scheduler-address", c.scheduler])
        wait_for_port(http_port, c.procs["gateway"], timeout=60)
        assert eventually(lambda: any(s.healthy for s in instances(c.scheduler)), timeout=60, interval=0.2), \
            c.tails()
        yield c
    finally:
        for proc in c.procs.values():
            stop(proc)


def test_with_the_token_everywhere_a_request_is_served(cluster):
    reply = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="x", timeout=60, max_retries=0) \
        .completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens == 8, cluster.tails()
    [status] = [s for s in instances(cluster.scheduler) if s.healthy]
    assert status.instance.address == cluster.worker
    assert worker_stats(cluster.worker).load.num_blocks > 0


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_the_scheduler_refuses_a_client_without_the_token(cluster, token):
    with pytest.raises(grpc.RpcError) as e:
        instances(cluster.scheduler, token)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_the_kvstore_refuses_a_client_without_the_token(cluster, token):
    kvstore_stats(cluster.kvstore)                 # with it: answered
    with pytest.raises(grpc.RpcError) as e:
        kvstore_stats(cluster.kvstore, token)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_the_worker_refuses_a_client_without_the_token(cluster, token):
    with pytest.raises(grpc.RpcError) as e:
        worker_stats(cluster.worker, token)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_worker_without_the_token_cannot_register(cluster):
    port = free_port()
    cluster.start("rogue", cluster.worker_args(port), token_file="")
    try:
        wait_for_port(port, cluster.procs["rogue"], timeout=120)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert f"127.0.0.1:{port}" not in {s.instance.address for s in instances(cluster.scheduler)}
            time.sleep(0.3)
    finally:
        stop(cluster.procs.pop("rogue"))


def test_the_token_is_not_in_any_log(cluster):
    for name in cluster.procs:
        assert TOKEN not in (cluster.folder / f"{name}.log").read_text(errors="replace"), name
