"""The preemption watcher: polls this machine's cloud metadata for a termination notice
(`--preemption-source aws|gcp|azure`) and tells the scheduler through `NotifyPreemption`.

    every --preemption-poll-s:  probe.look() ──none──▶ wait
                                     │ notice (first time this key is seen)
                                     ▼
                deadline = the cloud's time, or first seen + --preemption-grace-s
                                     │
                                     ▼  (a task, while polling goes on)
            NotifyPreemption(instance_id, deadline, source) ──fail──▶ back off, retry until the deadline
                                     │ ok
                                     ▼
            the scheduler drains this worker (Worker.Drain, live migration): the watcher does nothing more

Failures to read the metadata never stop the worker: each is counted by kind, the first of each kind is
logged as a warning (later ones at debug), and the next poll tries again. The worker does not drain
itself: the scheduler decides where its requests go, and its drain calls Worker.Drain.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import httpx

from services.common.grpc_util import aio_channel
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.worker.cloud_notices import CloudNotice
from services.worker.metadata_probes import MetadataProbe, PollError
from services.worker.metrics import PreemptionMetrics

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 2.0              # a metadata answer is local; a slow one is a failed poll
RPC_TIMEOUT_S = 5.0
FIRST_RETRY_S = 0.25
# The scheduler refuses these for good (bad request, migration off): retrying would only count the
# notice again.
FINAL_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True, slots=True)
class WatchConfig:
    instance_id: str              # the name this worker registered under
    scheduler_address: str
    poll_s: float = 5.0           # AWS's advice for instance-action
    grace_s: float = 30.0         # time left when the cloud names none (GCP's preemption gives ~30 s)

    def __post_init__(self) -> None:
        if self.poll_s <= 0 or self.grace_s <= 0:
            raise ValueError(f"preemption poll_s ({self.poll_s}) and grace_s ({self.grace_s}) must be > 0")


class PreemptionWatch:
    def __init__(self, probe: MetadataProbe, config: WatchConfig, metrics: PreemptionMetrics) -> None:
        self.probe, self.config, self.metrics = probe, config, metrics
        self.deadlines: dict[str, float] = {}        # notice key -> its deadline, once seen
        self._logged_kinds: set[str] = set()
        self._deliveries: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        log.info("watching %s for preemption notices every %.1f s", self.probe.source, self.config.poll_s)
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, trust_env=False) as http, \
                aio_channel(self.config.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            try:
                while not stop.is_set():
                    notice = await self.poll(http)
                    if notice is not None:
                        self._start_delivery(stub, notice)
                    try:
                        await asyncio.wait_for(stop.wait(), self.config.poll_s)
                    except TimeoutError:
                        pass
            finally:
                for task in self._deliveries:
                    task.cancel()
                await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def poll(self, http: httpx.AsyncClient) -> CloudNotice | None:
        """One look; the notice if it is new (its deadline recorded), else None."""
        try:
            notice = await self.probe.look(http)
        except PollError as e:
            self._count_error(e.kind, str(e))
            return None
        except Exception as e:  # noqa: BLE001 (a surprise answer must not end the watch, nor the worker)
            self._count_error("malformed", f"{type(e).__name__}: {e}")
            return None
        if notice is None or notice.key in self.deadlines:
            return None
        deadline = notice.deadline_unix_s or time.time() + self.config.grace_s
        self.deadlines[notice.key] = deadline
        self.metrics.notice(deadline)
        log.warning("%s: %s of %s in %.0f s: telling the scheduler", self.probe.source, notice.reason,
                    self.config.instance_id, deadline - time.time())
        return notice

    def _count_error(self, kind: str, message: str) -> None:
        self.metrics.poll_error(kind)
        level = logging.DEBUG if kind in self._logged_kinds else logging.WARNING
        self._logged_kinds.add(kind)
        log.log(level, "%s: no answer read (%s): %s; polling on", self.probe.source, kind, message)

    def _start_delivery(self, stub, notice: CloudNotice) -> None:
        task = asyncio.create_task(self.deliver(stub, notice.key))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def deliver(self, stub, key: str) -> bool:
        """NotifyPreemption until the scheduler takes it, refuses it for good, or the deadline passes."""
        deadline = self.deadlines[key]
        request = scheduler_pb2.PreemptionNotice(instance_id=self.config.instance_id, deadline_unix_s=deadline,
                                                 source=self.probe.source)
        delay, logged_codes = FIRST_RETRY_S, set()
        while True:
            try:
                reply = await stub.NotifyPreemption(request, timeout=RPC_TIMEOUT_S)
                log.info("scheduler took the preemption notice of %s (%d requests to move)",
                         self.config.instance_id, reply.num_requests)
                return True
            except grpc.aio.AioRpcError as e:
                self.metrics.notify_failure()
                if e.code() in FINAL_CODES:
                    log.error("scheduler refused the preemption notice of %s: %s %s", self.config.instance_id,
                              e.code().name, e.details())
                    return False
                if e.code() not in logged_codes:
                    logged_codes.add(e.code())
                    log.warning("NotifyPreemption failed (%s: %s); retrying until the deadline", e.code().name,
                                e.details())
            if time.time() + delay >= deadline:
                log.error("preemption notice of %s not delivered before its deadline", self.config.instance_id)
                return False
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.config.poll_s)
