"""Mutual TLS between real processes on loopback: a scheduler, a kvstore, a sim-engine worker and a
gateway, all given FERRY_TLS_DIR (certificates from `ferry admin tls create`). Every hop works over TLS
(registration, heartbeats, Route, Prefill, the token sink: a completion comes back); a plaintext client
or one with another CA's certificate gets nothing, and a worker without TLS cannot register."""
from __future__ import annotations

import grpc
import pytest

from services.common import service_tls
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.security.test_service_auth_stack import Cluster

pytestmark = pytest.mark.integration


def tls_channel(address: str, folder) -> grpc.Channel:
    files = service_tls.read_folder(folder)
    return grpc.secure_channel(address, service_tls.channel_credentials(files), options=service_tls.CHANNEL_OPTIONS)


def instances(address: str, folder) -> list[scheduler_pb2.InstanceStatus]:
    with tls_channel(address, folder) as ch:
        return list(scheduler_pb2_grpc.SchedulerStub(ch).ListInstances(
            scheduler_pb2.ListInstancesRequest(), timeout=5).instances)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path, certs):
    c = Cluster(tmp_path_factory.mktemp("service-tls"), smollm2_path, {service_tls.TLS_DIR_ENV: str(certs[0])})
    try:
        yield c.launch(lambda: any(s.healthy for s in instances(c.scheduler, certs[0])))
    finally:
        c.stop()


def test_over_tls_everywhere_a_request_is_served(cluster, certs):
    assert cluster.completion().usage.completion_tokens == 8, cluster.tails()
    with tls_channel(cluster.worker, certs[0]) as ch:
        assert worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5).load.num_blocks > 0


@pytest.mark.parametrize("service", ["scheduler", "worker", "kvstore"])
def test_plaintext_clients_get_nothing(cluster, service):
    """Any call: the TLS handshake fails before a method is looked up."""
    with grpc.insecure_channel(getattr(cluster, service)) as ch, pytest.raises(grpc.RpcError) as e:
        scheduler_pb2_grpc.SchedulerStub(ch).ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_of_another_ca_gets_nothing(cluster, certs):
    with pytest.raises(grpc.RpcError) as e:
        instances(cluster.scheduler, certs[1])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_worker_without_tls_cannot_register(cluster, certs):
    cluster.assert_cannot_register({service_tls.TLS_DIR_ENV: ""},
                                   lambda: {s.instance.address for s in instances(cluster.scheduler, certs[0])})


def test_no_key_material_in_any_log(cluster, certs):
    key = (certs[0] / "tls.key").read_text().splitlines()[1]           # a line of the key's base64
    for name in cluster.procs:
        assert key not in (cluster.folder / f"{name}.log").read_text(errors="replace"), name
