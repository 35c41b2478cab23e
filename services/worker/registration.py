"""Keeping a worker known to the scheduler: register, then heartbeat its load; re-register when the
scheduler says it does not know us (it restarted without Redis) or was unreachable."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from services.common.grpc_util import aio_channel
from services.gen.ferry.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


async def keep_registered(address: str, instance: common_pb2.Instance,
                          load: Callable[[], common_pb2.WorkerLoad], stop: asyncio.Event) -> None:
    async with aio_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        interval, registered = 0.5, False
        while not stop.is_set():
            try:
                if not registered:
                    reply = await stub.Register(instance, timeout=5)
                    interval, registered = reply.heartbeat_interval_s or interval, True
                    log.info("registered %s with the scheduler at %s", instance.instance_id, address)
                beat = await stub.Heartbeat(scheduler_pb2.HeartbeatRequest(
                    instance_id=instance.instance_id, load=load()), timeout=5)
                registered = beat.known
            except grpc.aio.AioRpcError as e:
                log.warning("scheduler %s unreachable (%s); retrying", address, e.code().name)
                registered = False
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
        try:
            await stub.Deregister(scheduler_pb2.DeregisterRequest(instance_id=instance.instance_id), timeout=2)
        except grpc.aio.AioRpcError:
            pass
