"""Wire ↔ core types for the scheduler: proto messages in, validated cluster dataclasses out.

Validation lives here, at the edge: a `ValueError` from these functions becomes INVALID_ARGUMENT
with its message, so the core types can assume well-formed values.
"""
from __future__ import annotations

from services.common.block_keys import ROOT_KEY
from services.common.cluster import (
    InstanceSpec,
    InstanceState,
    Priority,
    RequestLoad,
    RequestPhase,
    Role,
    RouteRequest,
    WorkerLoad,
)
from services.gen.ferry.v1 import common_pb2, scheduler_pb2

ROLE_FROM_PROTO = {common_pb2.ROLE_PREFILL: Role.PREFILL, common_pb2.ROLE_DECODE: Role.DECODE,
                   common_pb2.ROLE_BOTH: Role.BOTH}
ROLE_TO_PROTO = {v: k for k, v in ROLE_FROM_PROTO.items()}
PRIORITY_FROM_PROTO = {common_pb2.PRIORITY_UNSPECIFIED: Priority.NORMAL, common_pb2.PRIORITY_HIGH: Priority.HIGH,
                       common_pb2.PRIORITY_NORMAL: Priority.NORMAL, common_pb2.PRIORITY_LOW: Priority.LOW}
PRIORITY_TO_PROTO = {Priority.HIGH: common_pb2.PRIORITY_HIGH, Priority.NORMAL: common_pb2.PRIORITY_NORMAL,
                     Priority.LOW: common_pb2.PRIORITY_LOW}
PHASE_FROM_PROTO = {common_pb2.REQUEST_PHASE_WAITING: RequestPhase.WAITING,
                    common_pb2.REQUEST_PHASE_PREFILLING: RequestPhase.PREFILLING,
                    common_pb2.REQUEST_PHASE_DECODING: RequestPhase.DECODING,
                    common_pb2.REQUEST_PHASE_MIGRATING: RequestPhase.MIGRATING,
                    common_pb2.REQUEST_PHASE_ARRIVING: RequestPhase.ARRIVING}
PHASE_TO_PROTO = {v: k for k, v in PHASE_FROM_PROTO.items()}
BLOCK_KEY_BYTES = len(ROOT_KEY)


def spec_from_proto(msg: common_pb2.Instance) -> InstanceSpec:
    if not msg.instance_id:
        raise ValueError("instance_id is empty")
    if msg.role not in ROLE_FROM_PROTO:
        raise ValueError(f"instance {msg.instance_id}: role must be ROLE_PREFILL, ROLE_DECODE or ROLE_BOTH")
    for name in ("address", "model"):
        if not getattr(msg, name):
            raise ValueError(f"instance {msg.instance_id}: {name} is empty")
    for name in ("block_size", "max_model_len"):
        if getattr(msg, name) <= 0:
            raise ValueError(f"instance {msg.instance_id}: {name} must be > 0")
    return InstanceSpec(instance_id=msg.instance_id, role=ROLE_FROM_PROTO[msg.role], address=msg.address,
                        model=msg.model, block_size=msg.block_size, max_model_len=msg.max_model_len,
                        metrics_url=msg.metrics_url)


def spec_to_proto(spec: InstanceSpec) -> common_pb2.Instance:
    return common_pb2.Instance(instance_id=spec.instance_id, role=ROLE_TO_PROTO[spec.role],
                               address=spec.address, model=spec.model, block_size=spec.block_size,
                               max_model_len=spec.max_model_len, metrics_url=spec.metrics_url)


def load_from_proto(msg: common_pb2.WorkerLoad) -> WorkerLoad:
    if msg.num_free_blocks > msg.num_blocks:
        raise ValueError(f"num_free_blocks {msg.num_free_blocks} > num_blocks {msg.num_blocks}")
    return WorkerLoad(num_running=msg.num_running, num_waiting=msg.num_waiting, num_blocks=msg.num_blocks,
                      num_free_blocks=msg.num_free_blocks, num_cached_blocks=msg.num_cached_blocks,
                      num_preemptions=msg.num_preemptions, draining=msg.draining,
                      requests=tuple(request_load_from_proto(r) for r in msg.requests),
                      num_waiting_tokens=msg.num_waiting_tokens)


def request_load_from_proto(msg: common_pb2.RequestLoad) -> RequestLoad:
    if not msg.request_id:
        raise ValueError("a request in the load report has an empty request_id")
    if msg.phase not in PHASE_FROM_PROTO:
        raise ValueError(f"request {msg.request_id}: phase is unspecified")
    return RequestLoad(request_id=msg.request_id, phase=PHASE_FROM_PROTO[msg.phase], num_tokens=msg.num_tokens,
                       num_blocks=msg.num_blocks, priority=priority_from_proto(msg.priority),
                       arrival=msg.arrival, max_tokens=msg.max_tokens)


def priority_from_proto(value: int) -> Priority:
    if value not in PRIORITY_FROM_PROTO:
        raise ValueError(f"priority {value} is not one of PRIORITY_HIGH, PRIORITY_NORMAL, PRIORITY_LOW")
    return PRIORITY_FROM_PROTO[value]


def load_to_proto(load: WorkerLoad) -> common_pb2.WorkerLoad:
    return common_pb2.WorkerLoad(num_running=load.num_running, num_waiting=load.num_waiting,
                                 num_blocks=load.num_blocks, num_free_blocks=load.num_free_blocks,
                                 num_cached_blocks=load.num_cached_blocks,
                                 num_preemptions=load.num_preemptions, draining=load.draining,
                                 requests=[request_load_to_proto(r) for r in load.requests],
                                 num_waiting_tokens=load.num_waiting_tokens)


def request_load_to_proto(r: RequestLoad) -> common_pb2.RequestLoad:
    return common_pb2.RequestLoad(request_id=r.request_id, phase=PHASE_TO_PROTO[r.phase], num_tokens=r.num_tokens,
                                  num_blocks=r.num_blocks, priority=PRIORITY_TO_PROTO[r.priority],
                                  arrival=r.arrival, max_tokens=r.max_tokens)


def route_request_from_proto(msg: scheduler_pb2.RouteRequest) -> RouteRequest:
    if not msg.request_id:
        raise ValueError("request_id is empty")
    if not msg.model:
        raise ValueError(f"request {msg.request_id}: model is empty")
    if msg.num_prompt_tokens == 0:
        raise ValueError(f"request {msg.request_id}: num_prompt_tokens must be > 0")
    bad = next((i for i, k in enumerate(msg.block_keys) if len(k) != BLOCK_KEY_BYTES), None)
    if bad is not None:
        raise ValueError(f"request {msg.request_id}: block_keys[{bad}] has {len(msg.block_keys[bad])} bytes, "
                         f"expected {BLOCK_KEY_BYTES} (raw digest, not hex)")
    return RouteRequest(request_id=msg.request_id, model=msg.model, block_keys=tuple(msg.block_keys),
                        num_prompt_tokens=msg.num_prompt_tokens, max_tokens=msg.max_tokens,
                        priority=priority_from_proto(msg.priority))


def status_to_proto(state: InstanceState, now: float, healthy: bool) -> scheduler_pb2.InstanceStatus:
    return scheduler_pb2.InstanceStatus(instance=spec_to_proto(state.spec), load=load_to_proto(state.load),
                                        last_heartbeat_age_s=max(0.0, now - state.last_heartbeat),
                                        healthy=healthy)


def recommendations_to_proto(decisions, signals, decided_at: float) -> scheduler_pb2.ScaleRecommendationsReply:
    """The autoscaler's latest `ScaleDecision`s (and the attainment each pool was judged by)."""
    def attainment(pool: str) -> float:
        value = signals[pool].slo_attainment if pool in signals else None
        return -1.0 if value is None else value
    return scheduler_pb2.ScaleRecommendationsReply(
        pools=[scheduler_pb2.PoolRecommendation(pool=d.pool, current=d.current, target=d.target, desired=d.desired,
                                                reason=d.reason, slo_attainment=attainment(d.pool))
               for d in decisions],
        decided_at_unix_s=decided_at)
