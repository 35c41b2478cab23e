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
    """A scheduler, a kvstore, a sim worker and a gateway on loopback, every process given `env` (what turns
    service authentication on); `start` takes another env for a process of its own."""
    def __init__(self, folder, model, env: dict[str, str]) -> None:
        self.folder, self.model, self.env, self.procs = folder, model, env, {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.procs[name] = start(args, log=self.folder / f"{name}.log", env=self.env if env is None else env)

    def launch(self, ready) -> Cluster:
        """Start all four; `ready()` says when the worker has registered (asked in the way that works)."""
        scheduler_port, worker_port, http_port, kvstore_port = free_port(), free_port(), free_port(), free_port()
        self.scheduler, self.worker = f"127.0.0.1:{scheduler_port}", f"127.0.0.1:{worker_port}"
        self.kvstore, self.url = f"127.0.0.1:{kvstore_port}", f"http://127.0.0.1:{http_port}"
        self.start("scheduler", ["serve", "scheduler", "--port", str(scheduler_port), "--heartbeat-interval-s", "0.2"])
        self.start("kvstore", ["serve", "kvstore", "--port", str(kvstore_port), "--capacity-gb", "0.1"])
        wait_for_port(scheduler_port, self.procs["scheduler"], timeout=60)
        wait_for_port(kvstore_port, self.procs["kvstore"], timeout=60)
        self.start("worker", self.worker_args(worker_port))
        wait_for_port(worker_port, self.procs["worker"], timeout=120)
        self.start("gateway", ["serve", "gateway", "--model", str(self.model), "--port", str(http_port),
                               "--sink-port", str(free_port()), "--scheduler-address", self.scheduler])
        wait_for_port(http_port, self.procs["gateway"], timeout=60)
        assert eventually(ready, timeout=60, interval=0.2), self.tails()
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            stop(proc)

    def assert_cannot_register(self, env: dict[str, str], addresses) -> None:
        """A worker started with `env` listens, yet for 3 s is not among `addresses()` (the scheduler's)."""
        port = free_port()
        self.start("rogue", self.worker_args(port), env=env)
        try:
            wait_for_port(port, self.procs["rogue"], timeout=120)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                assert f"127.0.0.1:{port}" not in addresses()
                time.sleep(0.3)
        finally:
            stop(self.procs.pop("rogue"))

    def completion(self) -> openai.types.Completion:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", timeout=60, max_retries=0) \
            .completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)

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
    folder = tmp_path_factory.mktemp("service-auth")
    token_file = folder / "service-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    c = Cluster(folder, smollm2_path, {service_auth.TOKEN_FILE_ENV: str(token_file)})
    try:
        yield c.launch(lambda: any(s.healthy for s in instances(c.scheduler)))
    finally:
        c.stop()


def test_with_the_token_everywhere_a_request_is_served(cluster):
    reply = cluster.completion()
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
    cluster.assert_cannot_register({service_auth.TOKEN_FILE_ENV: ""},
                                   lambda: {s.instance.address for s in instances(cluster.scheduler)})


def test_the_token_is_not_in_any_log(cluster):
    for name in cluster.procs:
        assert TOKEN not in (cluster.folder / f"{name}.log").read_text(errors="replace"), name
