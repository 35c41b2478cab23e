"""The operator's calls to a cluster's scheduler (grpc.aio), each with an explicit deadline.

    list_instances()                      → {instance id: InstanceLoad}
    recommendations()                     → {pool: desired replicas} (empty until the autoscaler decided)
    drain(instance_id, cancel=False)      → requests on it when the drain began; None if it is gone
    notify_preemption(id, deadline, source) → same as drain

A scheduler that does not answer raises SchedulerUnavailable; NOT_FOUND from a drain means the
instance is not registered (a pod that never came up, or already gone): nothing to drain.
"""
from __future__ import annotations

import grpc

from operators.ferry_operator.pool_plan import InstanceLoad
from services.common.grpc_util import aio_channel
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc


class SchedulerUnavailable(Exception):
    """The scheduler did not answer (or refused the call); the message says which and why."""


def instance_load(status: scheduler_pb2.InstanceStatus) -> InstanceLoad:
    load = status.load
    return InstanceLoad(num_requests=max(load.num_running + load.num_waiting, len(load.requests)),
                        is_draining=load.draining)


class SchedulerClient:
    """One scheduler's address, one channel (create and close it inside the event loop)."""

    def __init__(self, address: str, timeout_s: float = 3.0) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._channel = aio_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    def _error(self, call: str, e: grpc.aio.AioRpcError) -> SchedulerUnavailable:
        return SchedulerUnavailable(f"{call} at {self.address}: {e.code().name} {e.details() or ''}".strip())

    async def list_instances(self) -> dict[str, InstanceLoad]:
        try:
            reply = await self._stub.ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise self._error("ListInstances", e) from None
        return {s.instance.instance_id: instance_load(s) for s in reply.instances}

    async def recommendations(self) -> dict[str, int]:
        try:
            reply = await self._stub.GetScaleRecommendations(scheduler_pb2.ScaleRecommendationsRequest(),
                                                             timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise self._error("GetScaleRecommendations", e) from None
        return {p.pool: p.desired for p in reply.pools}

    async def drain(self, instance_id: str, cancel: bool = False) -> int | None:
        request = scheduler_pb2.DrainInstanceRequest(instance_id=instance_id, cancel=cancel)
        return await self._num_requests("DrainInstance", request)

    async def notify_preemption(self, instance_id: str, deadline_unix_s: float, source: str) -> int | None:
        notice = scheduler_pb2.PreemptionNotice(instance_id=instance_id, deadline_unix_s=deadline_unix_s,
                                                source=source)
        return await self._num_requests("NotifyPreemption", notice)

    async def _num_requests(self, method: str, request) -> int | None:
        """Call a drain-like RPC: the instance's request count, None when the scheduler does not know it."""
        try:
            reply = await getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error(method, e) from None
        return reply.num_requests

    async def close(self) -> None:
        await self._channel.close()
