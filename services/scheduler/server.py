"""The scheduler's gRPC servicer: the registry, the prefix index and the routing policy behind the wire.

Each RPC converts the proto message to core types (convert.py), calls the registry or the pure
policy with the wall clock as `now`, applies the side effects (prefix index, load reservation,
Redis, metrics) and converts back. Status codes:

    bad input                        INVALID_ARGUMENT, the message names the field
    Route finds no instance          UNAVAILABLE, the message says which phase and which filter
    Heartbeat from an unknown id     OK with known=false (the worker registers again)

A sweeper task marks silence: past the heartbeat timeout an instance is unhealthy (filtered out) and
its prefix-index entries are dropped (a worker that comes back may have lost its cache); past
`expiry_s` it is forgotten altogether.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import grpc

from services.common.cluster import NoRoute, Route, RouteRequest
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler import convert
from services.scheduler.autoscaler import Autoscaler
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.migrator import Migrator
from services.scheduler.persistence import RedisPersistence
from services.scheduler.policies.preemption import PreemptionNotice
from services.scheduler.policies.routing import RoutingPolicy, decide, record_route
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Registry

log = logging.getLogger("ferry.scheduler")


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, registry: Registry, prefix_index: PrefixIndex, policy: RoutingPolicy, *,
                 heartbeat_interval_s: float, expiry_s: float, persistence: RedisPersistence | None = None,
                 metrics: SchedulerMetrics | None = None, clock: Callable[[], float] = time.time,
                 migrator: Migrator | None = None, autoscaler: Autoscaler | None = None,
                 preemption_grace_s: float = 30.0) -> None:
        self.registry = registry
        self.preemption_grace_s = preemption_grace_s   # a notice without a deadline gets this long
        self.migrator = migrator
        self.autoscaler = autoscaler
        self.prefix_index = prefix_index
        self.policy = policy
        self.heartbeat_interval_s = heartbeat_interval_s
        self.expiry_s = expiry_s
        self.persistence = persistence
        self.metrics = metrics or SchedulerMetrics()
        self.clock = clock   # wall clock: heartbeat times outlive the process in Redis
        self.num_route_calls = 0   # the routing policy's ordinal (the round-robin picker turns on it)

    async def Register(self, request, context):
        try:
            spec = convert.spec_from_proto(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        is_new = self.registry.register(spec, self.clock())
        if not is_new:   # a worker registering again has restarted: its cache is not what we recorded
            self.prefix_index.remove_instance(spec.instance_id)
            self._forget_notice(spec.instance_id)                # and whatever preemption it had is past
        log.info("%s %s (%s, %s, model %s)", "registered" if is_new else "re-registered",
                 spec.instance_id, spec.role.value, spec.address, spec.model)
        await self._save(spec.instance_id)
        self._observe_instances()
        return scheduler_pb2.RegisterReply(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(self, request, context):
        try:
            load = convert.load_from_proto(request.load)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance {request.instance_id}: {e}")
        known = self.registry.heartbeat(request.instance_id, load, self.clock())
        if known and self.persistence is not None:
            self.persistence.mark(self.registry.get(request.instance_id))
        return scheduler_pb2.HeartbeatReply(known=known)

    async def Deregister(self, request, context):
        await self._forget(request.instance_id, "deregistered")
        return scheduler_pb2.DeregisterReply()

    async def Route(self, request, context):
        started = time.perf_counter()
        try:
            return await self._route(request, context)
        finally:
            self.metrics.route_duration.observe(time.perf_counter() - started)

    async def DrainInstance(self, request, context):
        if request.cancel:
            self._forget_notice(request.instance_id)
        return await self._drain(request.instance_id, context, lambda m: m.drain(request.instance_id, request.cancel))

    async def _drain(self, instance_id: str, context, drain) -> scheduler_pb2.DrainInstanceReply:
        """`drain(migrator)` marks the instance (and returns its number of requests); the mark is saved."""
        if self.migrator is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "live migration is off on this scheduler (--migration-interval-s 0)")
        try:
            num = await drain(self.migrator)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance {instance_id!r} is registered")
        await self._save(instance_id)
        return scheduler_pb2.DrainInstanceReply(num_requests=num)

    async def NotifyPreemption(self, request, context):
        """A spot termination: its notice goes to the evacuator, which plans each of its requests against
        the deadline every migration round, and the instance is drained at once (no new requests)."""
        if not request.instance_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instance_id is empty: name the instance to preempt")
        if not math.isfinite(request.deadline_unix_s) or request.deadline_unix_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"deadline_unix_s {request.deadline_unix_s}: give "
                                "the Unix time the instance goes away, or 0 when the cloud did not say")
        source = request.source or "unknown"
        now = self.clock()
        deadline = request.deadline_unix_s or now + self.preemption_grace_s
        notice = PreemptionNotice(request.instance_id, deadline, source)
        reply = await self._drain(request.instance_id, context, lambda m: m.preempt(notice))
        self.metrics.preemption_notices.labels(source=source.split(":", 1)[0]).inc()
        log.warning("preemption notice for %s from %s: deadline in %.0f s, %d requests to place",
                    request.instance_id, source, deadline - now, reply.num_requests)
        return reply

    async def ListInstances(self, request, context):
        snapshot = self.registry.snapshot(self.clock())
        return scheduler_pb2.ListInstancesReply(instances=[
            convert.status_to_proto(s, snapshot.now, snapshot.is_alive(s)) for s in snapshot.instances])

    async def GetScaleRecommendations(self, request, context):
        if self.autoscaler is None:
            return scheduler_pb2.ScaleRecommendationsReply()
        reply = convert.recommendations_to_proto(self.autoscaler.decisions, self.autoscaler.signals,
                                                 self.autoscaler.decided_at)
        if self.migrator is not None:
            # Replacement capacity, asked for now rather than after the instances are gone (SpotServe):
            # the policy counts a noticed instance out already, the platform still runs it.
            replacing = self.migrator.evacuator.replacements(self.registry.snapshot(self.clock()))
            for pool in reply.pools:
                if replacing.get(pool.pool):
                    pool.desired += replacing[pool.pool]
                    pool.reason = "preemption"
        return reply

    async def _route(self, request, context) -> scheduler_pb2.RouteReply:
        try:
            req = convert.route_request_from_proto(request)
        except ValueError as e:
            self.metrics.route_decisions.labels(result="invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        snapshot = self.registry.snapshot(self.clock()).without(request.exclude_instance_ids)
        started = time.perf_counter()
        decision = decide(snapshot, req, self.policy, self.prefix_index, ordinal=self.num_route_calls)
        self.metrics.routing_decision.observe(time.perf_counter() - started)
        self.num_route_calls += 1
        if isinstance(decision, NoRoute):
            self.metrics.route_decisions.labels(result="no_route").inc()
            log.warning("request %s: %s", req.request_id, decision.reason)
            await context.abort(grpc.StatusCode.UNAVAILABLE, decision.reason)
        self._apply(req, decision)
        result = "colocated" if decision.is_colocated else "disaggregated"
        self.metrics.route_decisions.labels(result=result).inc()
        prefill, decode = self.registry.get(decision.prefill_id), self.registry.get(decision.decode_id)
        return scheduler_pb2.RouteReply(prefill=convert.spec_to_proto(prefill.spec),
                                        decode=convert.spec_to_proto(decode.spec))

    def _apply(self, req: RouteRequest, route: Route) -> None:
        """Remember the prefix on the prefill instance and count the request against both loads."""
        record_route(self.prefix_index, req, route)
        decode = self.registry.get(route.decode_id)
        self.registry.reserve(route.decode_id, decode.spec.num_blocks_for(req.num_total_tokens))
        if not route.is_colocated:
            prefill = self.registry.get(route.prefill_id)
            self.registry.reserve(route.prefill_id, prefill.spec.num_blocks_for(req.num_prompt_tokens))

    async def sweep(self) -> None:
        """Drop the prefix entries of silent instances and forget those silent past `expiry_s`."""
        now = self.clock()
        for instance_id in self.registry.silent_ids(now, self.registry.heartbeat_timeout_s):
            self.prefix_index.remove_instance(instance_id)
        for instance_id in self.registry.silent_ids(now, self.expiry_s):
            await self._forget(instance_id, f"expired (silent for more than {self.expiry_s:g} s)")
        self._observe_instances()

    async def run_sweeper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sweep()
            try:
                await asyncio.wait_for(stop.wait(), self.heartbeat_interval_s)
            except TimeoutError:
                pass

    def _forget_notice(self, instance_id: str) -> None:
        if self.migrator is not None:
            self.migrator.evacuator.forget(instance_id)

    async def _forget(self, instance_id: str, why: str) -> None:
        self._forget_notice(instance_id)
        if self.registry.deregister(instance_id):
            log.info("%s %s", why, instance_id)
        self.prefix_index.remove_instance(instance_id)
        if self.persistence is not None:
            await self.persistence.delete_now(instance_id)
        self._observe_instances()

    async def _save(self, instance_id: str) -> None:
        state = self.registry.get(instance_id)
        if self.persistence is not None and state is not None:
            await self.persistence.save_now(state)

    def _observe_instances(self) -> None:
        self.metrics.observe_instances(self.registry.snapshot(self.clock()))
