"""SchedulerClient against a real grpc.aio server with a fake Scheduler: loads, NOT_FOUND, failures."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from operators.ferry_operator.pool_plan import InstanceLoad
from operators.ferry_operator.scheduler_client import SchedulerClient, SchedulerUnavailable
from services.common.grpc_util import aio_server, bind
from services.gen.ferry.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self):
        self.calls: list[tuple] = []
        self.stall = False

    async def ListInstances(self, request, context):
        if self.stall:
            await asyncio.sleep(5)
        return scheduler_pb2.ListInstancesReply(instances=[
            scheduler_pb2.InstanceStatus(instance=common_pb2.Instance(instance_id="decode-0"),
                                         load=common_pb2.WorkerLoad(num_running=2, num_waiting=1, draining=True)),
            scheduler_pb2.InstanceStatus(instance=common_pb2.Instance(instance_id="decode-1"), load=common_pb2.WorkerLoad())])

    async def DrainInstance(self, request, context):
        self.calls.append(("drain", request.instance_id, request.cancel))
        if request.instance_id == "gone":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such instance")
        if request.instance_id == "off":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "live migration is off")
        return scheduler_pb2.DrainInstanceReply(num_requests=3)

    async def NotifyPreemption(self, request, context):
        self.calls.append(("notice", request.instance_id, request.deadline_unix_s, request.source))
        if request.instance_id == "gone":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such instance")
        return scheduler_pb2.DrainInstanceReply(num_requests=1)


@pytest.fixture
async def fake():
    servicer = FakeScheduler()
    server = aio_server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    client = SchedulerClient(f"127.0.0.1:{port}", timeout_s=0.5)
    yield servicer, client
    await client.close()
    await server.stop(0)


async def test_list_instances_counts_running_and_waiting(fake):
    _, client = fake
    assert await client.list_instances() == {"decode-0": InstanceLoad(3, True), "decode-1": InstanceLoad(0, False)}


async def test_drain_cancel_and_not_found(fake):
    servicer, client = fake
    assert await client.drain("decode-0") == 3
    assert await client.drain("decode-0", cancel=True) == 3
    assert await client.drain("gone") is None
    assert servicer.calls == [("drain", "decode-0", False), ("drain", "decode-0", True), ("drain", "gone", False)]
    with pytest.raises(SchedulerUnavailable, match="FAILED_PRECONDITION"):
        await client.drain("off")


async def test_notify_preemption(fake):
    servicer, client = fake
    assert await client.notify_preemption("decode-1", 123.0, "node-taint:karpenter.sh/disrupted") == 1
    assert await client.notify_preemption("gone", 0.0, "x") is None
    assert servicer.calls[0] == ("notice", "decode-1", 123.0, "node-taint:karpenter.sh/disrupted")


async def test_deadline_and_unreachable_raise_scheduler_unavailable(fake):
    servicer, client = fake
    servicer.stall = True
    with pytest.raises(SchedulerUnavailable, match="DEADLINE_EXCEEDED"):
        await client.list_instances()
    nobody = SchedulerClient("127.0.0.1:1", timeout_s=0.5)
    with pytest.raises(SchedulerUnavailable, match="ListInstances at 127.0.0.1:1"):
        await nobody.list_instances()
    await nobody.close()
