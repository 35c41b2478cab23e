"""The cluster-state types every policy reads: instances, their load, a snapshot in time, decisions.

Policies are pure functions of a `ClusterSnapshot` (frozen data, time included as `now`), so the same
policy code runs in the scheduler, in the simulator (virtual clock) and in unit tests. Nothing here
imports grpc or reads the clock; the scheduler's server converts the wire types at its edge.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace


class Role(enum.Enum):
    """The phases an instance serves. BOTH is a colocated instance (prefill and decode in one engine)."""
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def can_prefill(self) -> bool:
        return self is not Role.DECODE

    @property
    def can_decode(self) -> bool:
        return self is not Role.PREFILL


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What an instance is: fixed for its lifetime (it registers again to change it)."""
    instance_id: str
    role: Role
    address: str                  # host:port of its Worker service
    model: str                    # served model name
    block_size: int               # tokens per KV block
    max_model_len: int            # context length in tokens
    metrics_url: str = ""         # Prometheus /metrics endpoint, "" if none

    def num_blocks_for(self, num_tokens: int) -> int:
        """KV blocks that `num_tokens` tokens occupy on this instance."""
        return math.ceil(num_tokens / self.block_size) if self.block_size > 0 else 0


class Priority(enum.Enum):
    """A request's priority class. HIGH gets KV headroom normal requests cannot take and is never a
    migration victim; LOW is moved first."""
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class RequestPhase(enum.Enum):
    WAITING = "waiting"          # queued, or preempted and waiting to be recomputed
    PREFILLING = "prefilling"
    DECODING = "decoding"
    MIGRATING = "migrating"      # decoding while its KV is copied elsewhere
    ARRIVING = "arriving"        # admitted here; its KV is still arriving


@dataclass(frozen=True, slots=True)
class RequestLoad:
    """One request on an instance, as its last heartbeat reported it."""
    request_id: str
    phase: RequestPhase
    num_tokens: int = 0          # prompt + generated so far
    num_blocks: int = 0          # KV blocks held on the instance
    priority: Priority = Priority.NORMAL
    arrival: int = 0             # admission order on the instance (larger = later)
    max_tokens: int = 0          # tokens it may still generate


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """An instance's load as its last heartbeat reported it (all zero before the first one).

    `num_free_blocks` counts every block a new request can take, cached-but-unreferenced ones
    included (the engine evicts those LRU on demand); `num_cached_blocks` is how many hold a prefix.
    """
    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_cached_blocks: int = 0
    num_preemptions: int = 0
    draining: bool = False
    requests: tuple[RequestLoad, ...] = ()     # every request on the instance
    num_waiting_tokens: int = 0                # uncomputed prompt tokens of waiting requests

    @property
    def num_queued(self) -> int:
        """Requests the instance holds: running plus waiting."""
        return self.num_running + self.num_waiting

    @property
    def free_fraction(self) -> float:
        """Free KV blocks over all KV blocks; 0 when the instance has not reported its pool yet."""
        return self.num_free_blocks / self.num_blocks if self.num_blocks > 0 else 0.0


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One instance as the scheduler knows it at a point in time."""
    spec: InstanceSpec
    load: WorkerLoad = field(default_factory=WorkerLoad)
    last_heartbeat: float = 0.0   # seconds on the snapshot's clock (register counts as a heartbeat)

    @property
    def instance_id(self) -> str:
        return self.spec.instance_id


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Every known instance at time `now`. An instance is alive while its last heartbeat is at most
    `heartbeat_timeout_s` old; instances are ordered by id, so iteration order is deterministic."""
    now: float
    instances: tuple[InstanceState, ...] = ()
    heartbeat_timeout_s: float = 3.0

    def heartbeat_age_s(self, instance: InstanceState) -> float:
        return max(0.0, self.now - instance.last_heartbeat)

    def is_alive(self, instance: InstanceState) -> bool:
        """Heard from within the heartbeat timeout (draining instances are alive but take no work)."""
        return self.heartbeat_age_s(instance) <= self.heartbeat_timeout_s

    def get(self, instance_id: str) -> InstanceState | None:
        return next((i for i in self.instances if i.instance_id == instance_id), None)

    @property
    def instance_ids(self) -> tuple[str, ...]:
        return tuple(i.instance_id for i in self.instances)

    def alive(self) -> tuple[InstanceState, ...]:
        return tuple(i for i in self.instances if self.is_alive(i))

    def serving(self, model: str) -> tuple[InstanceState, ...]:
        return tuple(i for i in self.instances if i.spec.model == model)

    def without(self, instance_ids: Iterable[str]) -> ClusterSnapshot:
        """The same snapshot minus `instance_ids` (a resumed request must not go back to the instance
        it just lost, which may still look healthy until its heartbeats are overdue)."""
        excluded = set(instance_ids)
        if not excluded:
            return self
        return replace(self, instances=tuple(i for i in self.instances if i.instance_id not in excluded))


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing needs to know about one request (the prompt itself stays with the gateway)."""
    request_id: str
    model: str
    block_keys: tuple[bytes, ...] = ()   # chained keys of the prompt's full blocks (block_keys.py)
    num_prompt_tokens: int = 0
    max_tokens: int = 0
    priority: Priority = Priority.NORMAL

    @property
    def num_total_tokens(self) -> int:
        """Tokens the request can hold at its end: the prompt plus every token it may generate."""
        return self.num_prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision: prefill on one instance, decode on another (the same one if colocated)."""
    prefill_id: str
    decode_id: str

    @property
    def is_colocated(self) -> bool:
        return self.prefill_id == self.decode_id


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No instance can take the request; `reason` says why in words an operator can act on."""
    reason: str


class MigrationReason(enum.Enum):
    LOAD_BALANCE = "load_balance"          # from the least free instance to the most free
    DEFRAGMENTATION = "defragmentation"    # make room for a queued request that fits nowhere
    PRIORITY = "priority"                  # restore headroom for high-priority requests
    DRAIN = "drain"                        # empty an instance (scale-down, an admin's drain)
    PREEMPTION = "preemption"              # off an instance a cloud reclaims at a deadline (preemption.py)


@dataclass(frozen=True, slots=True)
class Migration:
    """A decision: live-migrate one running request from one decode instance to another."""
    request_id: str
    source_id: str
    destination_id: str
    reason: MigrationReason
