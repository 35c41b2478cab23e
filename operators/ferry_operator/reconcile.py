"""Observed state of one InferenceCluster → the plan that moves it toward its spec (pure).

    Observed ──reconcile()──▶ Plan: objects to apply (missing, or spec-hash differs) and to prune,
                                    drains to start/cancel, pods to delete, pool replicas, new status

No kopf, kubernetes, grpc or asyncio here, and no clock: `now` is part of what was observed. The
status in the plan describes the world after the plan is carried out, so reconciling that world
again gives a plan with no actions and the same status (tests/operator/test_reconcile.py checks it).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from operators.ferry_operator.manifests import ObjectKey, is_pool_deployment, key_of
from operators.ferry_operator.names import COMPONENT_LABEL, POOLS, SPEC_HASH
from operators.ferry_operator.pool_plan import InstanceLoad, PodState, PoolDecision, PoolObserved, decide_pool
from operators.ferry_operator.spec import ClusterSpec
from operators.ferry_operator.status import Condition, conditions_status, draining_records


@dataclass(frozen=True, slots=True)
class DeploymentState:
    replicas: int
    ready_replicas: int = 0


@dataclass(frozen=True, slots=True)
class Observed:
    spec: ClusterSpec
    generation: int
    desired: tuple[dict, ...]                              # manifests.render(...)
    existing: Mapping[ObjectKey, str]                      # our objects that exist → their spec-hash
    deployments: Mapping[str, DeploymentState]             # component → its Deployment
    pods: Mapping[str, tuple[PodState, ...]]               # pool → its pods
    instances: Mapping[str, InstanceLoad] | None           # the scheduler's view; None: it did not answer
    status: Mapping[str, Any]                              # the InferenceCluster's status as it is
    now: float                                             # unix seconds
    recommendations: Mapping[str, int] = field(default_factory=dict)   # pool → the scheduler's replicas
    poll_seconds: float = 1.0                              # requeue interval while converging


@dataclass(frozen=True, slots=True)
class Plan:
    apply: tuple[dict, ...] = ()
    prune: tuple[ObjectKey, ...] = ()
    start_drains: tuple[str, ...] = ()        # instance ids (= pod names)
    cancel_drains: tuple[str, ...] = ()
    delete_pods: tuple[str, ...] = ()
    scale: Mapping[str, int] = field(default_factory=dict)    # pool → Deployment replicas
    timed_out: tuple[str, ...] = ()           # pods deleted by the drain timeout (for a warning)
    status: Mapping[str, Any] = field(default_factory=dict)
    requeue_after: float | None = None        # reconcile again this soon (None: the regular resync)

    @property
    def has_actions(self) -> bool:
        return bool(self.apply or self.prune or self.start_drains or self.cancel_drains or self.delete_pods
                    or self.scale)


def _pool_observed(obs: Observed, pool: str) -> PoolObserved:
    dep = obs.deployments.get(pool)
    return PoolObserved(spec=obs.spec.pool(pool), replicas=None if dep is None else dep.replicas,
                        pods=obs.pods.get(pool, ()), draining=draining_records(obs.status, pool, obs.now),
                        recommendation=obs.recommendations.get(pool))


def _to_apply(obs: Observed, decisions: Mapping[str, PoolDecision]) -> tuple[dict, ...]:
    """Missing or changed objects. A new pool Deployment starts at the desired size; an existing one
    keeps its live replicas (scaling is a separate step, after the drained pods are deleted)."""
    out = []
    for obj in obs.desired:
        if obs.existing.get(key_of(obj)) == obj["metadata"]["annotations"][SPEC_HASH]:
            continue
        if is_pool_deployment(obj):
            pool = obj["metadata"]["labels"][COMPONENT_LABEL]
            dep = obs.deployments.get(pool)
            obj = copy.deepcopy(obj)
            obj["spec"]["replicas"] = decisions[pool].desired if dep is None else dep.replicas
        out.append(obj)
    return tuple(out)


def _wanted(obs: Observed, decisions: Mapping[str, PoolDecision]) -> dict[str, int]:
    """Ready pods each component should have (kvstore: none when disabled)."""
    return {"scheduler": 1, "kvstore": 1 if obs.spec.kvstore.enabled else 0,
            "gateway": obs.spec.gateway.replicas, **{p: decisions[p].desired for p in POOLS}}


def _conditions(obs: Observed, decisions: Mapping[str, PoolDecision]) -> list[Condition]:
    wanted = _wanted(obs, decisions)
    ready = {c: (obs.deployments[c].ready_replicas if c in obs.deployments else 0) for c in wanted}
    counts = {c: f"{c} {ready[c]}/{n}" for c, n in wanted.items() if n > 0}
    missing = [counts[c] for c, n in wanted.items() if n > 0 and ready[c] == 0]
    draining = [f"{p} ({', '.join(r.pod for r in d.records)})" for p, d in decisions.items() if d.records]
    scaling = [f"{p} {d.replicas}→{d.desired}" for p, d in decisions.items()
               if d.replicas is not None and d.replicas != d.desired]
    rolling = [counts[c] for c, n in wanted.items() if ready[c] < n]
    if draining:
        progressing = Condition("Progressing", True, "Draining", "draining before scale-down: " + "; ".join(draining))
    elif scaling:
        progressing = Condition("Progressing", True, "Scaling", "scaling " + ", ".join(scaling))
    elif rolling:
        progressing = Condition("Progressing", True, "RollingOut", "waiting for ready pods: " + ", ".join(rolling))
    else:
        progressing = Condition("Progressing", False, "Settled", "every component has its desired ready pods")
    serving = Condition("Ready", True, "Serving", "ready: " + ", ".join(counts.values())) if not missing else \
        Condition("Ready", False, "ComponentsNotReady", "no ready pod yet: " + ", ".join(missing))
    if obs.instances is None and ready["scheduler"] > 0:
        degraded = Condition("Degraded", True, "SchedulerUnreachable",
                             "the scheduler does not answer ListInstances: scale-down waits for it")
    else:
        degraded = Condition("Degraded", False, "AsExpected", "the scheduler answers")   # never "": 1.20 rejects it
    return [serving, progressing, degraded]


def _pool_status(obs: Observed, pool: str, d: PoolDecision) -> dict:
    dep = obs.deployments.get(pool)
    out = {"replicas": d.desired if d.replicas is None else d.replicas,
           "readyReplicas": 0 if dep is None else dep.ready_replicas, "desiredReplicas": d.desired,
           "draining": [r.to_status() for r in d.records]}
    if pool in obs.recommendations:
        out["recommendedReplicas"] = obs.recommendations[pool]
    return out


def reconcile(obs: Observed) -> Plan:
    """The next step for one InferenceCluster (see the module docstring)."""
    decisions = {pool: decide_pool(_pool_observed(obs, pool), obs.instances, obs.now, obs.spec.drain_timeout_s)
                 for pool in POOLS}
    desired_keys = {key_of(o) for o in obs.desired}
    conditions = _conditions(obs, decisions)
    status = {"observedGeneration": obs.generation,
              "pools": {p: _pool_status(obs, p, d) for p, d in decisions.items()},
              "conditions": conditions_status(conditions, obs.status.get("conditions"), obs.generation, obs.now)}
    plan = Plan(
        apply=_to_apply(obs, decisions), prune=tuple(sorted(k for k in obs.existing if k not in desired_keys)),
        start_drains=tuple(i for d in decisions.values() for i in d.start_drains),
        cancel_drains=tuple(i for d in decisions.values() for i in d.cancel_drains),
        delete_pods=tuple(i for d in decisions.values() for i in d.delete_pods),
        scale={p: d.replicas for p, d in decisions.items()
               if d.replicas is not None and d.replicas != obs.deployments[p].replicas},
        timed_out=tuple(i for d in decisions.values() for i in d.timed_out), status=status)
    is_settled = not plan.has_actions and not any(c.status for c in conditions if c.type == "Progressing")
    return dataclasses.replace(plan, requeue_after=None if is_settled else obs.poll_seconds)
