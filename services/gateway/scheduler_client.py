"""The gateway's view of the cluster: routes from the scheduler, and the served models (refreshed)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.common.grpc_util import aio_channel
from services.gen.ferry.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


class NoRoute(Exception):
    """No worker can take the request now (HTTP 503)."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    block_size: int
    max_model_len: int


class SchedulerClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = aio_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self.models: dict[str, ModelInfo] = {}
        self.instance_ids: dict[str, str] = {}          # address -> instance id, as last listed
        self.on_refresh: Callable[[set[str]], None] | None = None   # called with the healthy addresses

    async def route(self, request: scheduler_pb2.RouteRequest) -> tuple[common_pb2.Instance, common_pb2.Instance]:
        try:
            reply = await self._stub.Route(request, timeout=5)
        except grpc.aio.AioRpcError as e:
            raise NoRoute(e.details() or f"the scheduler at {self.address} is unreachable") from None
        return reply.prefill, reply.decode

    async def refresh(self) -> None:
        reply = await self._stub.ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=5)
        models: dict[str, ModelInfo] = {}
        for status in reply.instances:
            inst = status.instance
            known = models.get(inst.model)
            # a request must fit every instance it may run on (prefill and decode): the smallest limit
            if status.healthy and (known is None or inst.max_model_len < known.max_model_len):
                models[inst.model] = ModelInfo(inst.model, inst.block_size, inst.max_model_len)
        self.models = models
        self.instance_ids.update({s.instance.address: s.instance.instance_id for s in reply.instances})
        if self.on_refresh is not None:
            self.on_refresh({s.instance.address for s in reply.instances if s.healthy})

    def instance_id_at(self, address: str) -> str:
        """The instance serving at `address` when the scheduler last listed it ("" if never)."""
        return self.instance_ids.get(address, "")

    async def keep_refreshed(self, interval_s: float = 1.0) -> None:
        while True:
            try:
                await self.refresh()
            except grpc.aio.AioRpcError as e:
                log.warning("cannot list instances from the scheduler (%s)", e.code().name)
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        await self._channel.close()
