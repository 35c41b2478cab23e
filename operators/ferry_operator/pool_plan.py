"""One worker pool's size: scale up at once, scale down by draining first (pure; docs/kubernetes.md).

    desired = clamp(recommendation or spec replicas, minReplicas, maxReplicas)

    desired > replicas ──▶ replicas := desired; every recorded drain is cancelled
    desired < replicas ──▶ replicas the ReplicaSet has no pod for are dropped at once; for the rest:
        pick victims (not ready / pending first, then fewest requests, then newest) ─▶ record + DrainInstance
        a victim is done when its instance holds 0 requests, is unknown to the scheduler, never ran
        (Pending), or drain.timeoutSeconds passed ─▶ delete the pod AND replicas -= 1, in one plan

The pod is deleted before replicas are lowered: if the ReplicaSet replaces it in between, the new
pod is pending and not ready, so it is the one the lower count removes. With the scheduler
unreachable no drain starts (its view is needed to pick and to finish), but scale-up still happens.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from operators.ferry_operator.spec import PoolSpec
from operators.ferry_operator.status import DrainRecord


@dataclass(frozen=True, slots=True)
class PodState:
    name: str
    phase: str = "Running"
    is_ready: bool = True
    is_terminating: bool = False
    created_at: float = 0.0       # unix seconds
    node_name: str = ""


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One instance in the scheduler's view (instance id = pod name)."""
    num_requests: int
    is_draining: bool = False


@dataclass(frozen=True, slots=True)
class PoolObserved:
    spec: PoolSpec
    replicas: int | None                     # the Deployment's spec.replicas; None: no Deployment yet
    pods: tuple[PodState, ...] = ()
    draining: tuple[DrainRecord, ...] = ()   # status.pools.<pool>.draining
    recommendation: int | None = None        # the scheduler's, when it has one


@dataclass(frozen=True, slots=True)
class PoolDecision:
    desired: int
    replicas: int | None                     # the Deployment's replicas after this plan
    records: tuple[DrainRecord, ...] = ()    # drains still under way after this plan
    start_drains: tuple[str, ...] = ()
    cancel_drains: tuple[str, ...] = ()
    delete_pods: tuple[str, ...] = ()
    timed_out: tuple[str, ...] = ()          # deleted although their requests had not moved away


def _victim_rank(pod: PodState, instances: Mapping[str, InstanceLoad]) -> tuple:
    load = instances.get(pod.name)
    return (pod.is_ready, pod.phase != "Pending", load.num_requests if load else 0, -pod.created_at, pod.name)


def _is_done(pod: PodState, record: DrainRecord, instances: Mapping[str, InstanceLoad] | None,
             now: float, timeout_s: float) -> bool:
    if pod.phase == "Pending":
        return True                          # never ran: it holds no requests
    if instances is not None:
        load = instances.get(pod.name)
        if load is None or load.num_requests == 0:
            return True
    return now - record.since >= timeout_s


def _drain_needed(pod: str, instances: Mapping[str, InstanceLoad] | None) -> bool:
    load = None if instances is None else instances.get(pod)
    return load is not None and not load.is_draining


def decide_pool(obs: PoolObserved, instances: Mapping[str, InstanceLoad] | None, now: float,
                timeout_s: float) -> PoolDecision:
    """The pool's next step; `instances` is None when the scheduler did not answer."""
    rec = obs.recommendation
    desired = obs.spec.clamp(rec if rec is not None else obs.spec.replicas)
    if obs.replicas is None:
        return PoolDecision(desired=desired, replicas=None)
    live = {p.name: p for p in obs.pods if not p.is_terminating}
    records = sorted((r for r in obs.draining if r.pod in live), key=lambda r: (r.since, r.pod))
    replicas = obs.replicas
    if desired > replicas:
        replicas = desired
    else:   # replicas without a pod go first: lowering them removes no serving pod
        replicas -= min(replicas - desired, max(0, replicas - len(live)))
    needed = replicas - desired
    kept, extra = records[:needed], records[needed:]
    if instances is None:   # no cancels, no new victims: the extra records wait for the scheduler
        cancel, waiting = (), tuple(extra)
    else:
        cancel, waiting = tuple(r.pod for r in extra if r.pod in instances), ()
        recorded = {r.pod for r in kept}
        candidates = sorted((p for p in live.values() if p.name not in recorded),
                            key=lambda p: _victim_rank(p, instances))
        kept += [DrainRecord(p.name, now) for p in candidates[:needed - len(kept)]]
    done = [r for r in kept if _is_done(live[r.pod], r, instances, now, timeout_s)]
    return PoolDecision(
        desired=desired, replicas=replicas - len(done),
        records=tuple(sorted((r for r in kept if r not in done), key=lambda r: (r.since, r.pod))) + waiting,
        start_drains=tuple(r.pod for r in kept if _drain_needed(r.pod, instances)), cancel_drains=cancel,
        delete_pods=tuple(r.pod for r in done),
        timed_out=tuple(r.pod for r in done if _held_requests(live[r.pod], instances)))


def _held_requests(pod: PodState, instances: Mapping[str, InstanceLoad] | None) -> bool:
    """Whether a finished victim may still have held requests (it was removed by the timeout)."""
    if pod.phase == "Pending":
        return False
    load = None if instances is None else instances.get(pod.name)
    return instances is None or (load is not None and load.num_requests > 0)
