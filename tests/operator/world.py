"""A small simulated world for reconcile tests: build an Observed, and carry a Plan out on it."""
from __future__ import annotations

import dataclasses

from operators.ferry_operator.manifests import RenderOptions, key_of, render, spec_hash
from operators.ferry_operator.names import COMPONENT_LABEL, ClusterRef
from operators.ferry_operator.pool_plan import InstanceLoad, PodState
from operators.ferry_operator.reconcile import DeploymentState, Observed, Plan
from operators.ferry_operator.spec import ClusterSpec, parse_spec
from operators.ferry_operator.status import format_time

REF = ClusterRef("demo", "ns", "uid-1")
NOW = 1_700_000_000.0
TIMEOUT = 60
OPTIONS = RenderOptions()
BASE = {"model": {"name": "m"}, "drain": {"timeoutSeconds": TIMEOUT},
        "pools": {"prefill": {"replicas": 1, "maxReplicas": 8}, "decode": {"replicas": 3, "maxReplicas": 8}}}


def make_spec(**pools) -> ClusterSpec:
    """BASE with pool overrides, e.g. make_spec(decode={"replicas": 1})."""
    body = {**BASE, "pools": {p: {**BASE["pools"][p], **pools.get(p, {})} for p in BASE["pools"]}}
    return parse_spec(body)


def pods(pool: str, n: int, *, ready: bool = True, start: int = 0, created: float = NOW - 1000) -> tuple:
    """n pods named <pool>-<i>, pod i created i seconds after `created`."""
    return tuple(PodState(f"{pool}-{i}", is_ready=ready, created_at=created + i, node_name=f"node-{i % 2}")
                 for i in range(start, start + n))


def loads(pod_list, requests: int | dict = 2, draining: tuple = ()) -> dict[str, InstanceLoad]:
    """The scheduler's view of `pod_list`; `requests` is one count for all, or pod → count."""
    count = (lambda name: requests.get(name, 0)) if isinstance(requests, dict) else (lambda _name: requests)
    return {p.name: InstanceLoad(count(p.name), p.name in draining) for p in pod_list}


def drain_status(pool: str, *records: tuple[str, float]) -> dict:
    return {"pools": {pool: {"draining": [{"pod": pod, "since": format_time(since)} for pod, since in records]}}}


def observed(spec: ClusterSpec | None = None, *, prefill=None, decode=None, instances="all", replicas=None,
             ready=None, status=None, now: float = NOW, recommendations=None, existing="all",
             options: RenderOptions = OPTIONS) -> Observed:
    """By default every object is applied, 1 prefill and 3 decode pods run (BASE's sizes, whatever
    `spec` says), all ready, Deployments sized to them, each pod known to the scheduler with 2 requests."""
    spec = spec or make_spec()
    prefill = pods("prefill", 1) if prefill is None else tuple(prefill)
    decode = pods("decode", 3) if decode is None else tuple(decode)
    desired = render(REF, spec, options)
    if existing == "all":
        existing = {key_of(o): spec_hash(o) for o in desired}
    replicas = {"prefill": len(prefill), "decode": len(decode), **(replicas or {})}
    ready_counts = {"scheduler": 1, "kvstore": 1, "gateway": 1,
                    "prefill": sum(p.is_ready for p in prefill), "decode": sum(p.is_ready for p in decode),
                    **(ready or {})}
    deployments = {c: DeploymentState(replicas.get(c, 1), ready_counts[c]) for c in ready_counts
                   if ("Deployment", REF.object_name(c)) in existing}
    if instances == "all":
        instances = loads(prefill + decode)
    return Observed(spec=spec, generation=3, desired=desired, existing=existing, deployments=deployments,
                    pods={"prefill": prefill, "decode": decode}, instances=instances, status=status or {},
                    now=now, recommendations=recommendations or {})


def carry_out(obs: Observed, plan: Plan) -> Observed:
    """The world after `plan` is executed (pods are not replaced, nothing becomes ready)."""
    existing = dict(obs.existing)
    deployments = dict(obs.deployments)
    for obj in plan.apply:
        existing[key_of(obj)] = obj["metadata"]["annotations"]["serving.ferry.dev/spec-hash"]
        component = obj["metadata"]["labels"].get(COMPONENT_LABEL)
        if obj["kind"] == "Deployment" and component not in deployments:
            deployments[component] = DeploymentState(obj["spec"]["replicas"], 0)
    for key in plan.prune:
        existing.pop(key)
    for pool, n in plan.scale.items():
        deployments[pool] = dataclasses.replace(deployments[pool], replicas=n)
    deleted = set(plan.delete_pods)
    new_pods = {pool: tuple(p for p in ps if p.name not in deleted) for pool, ps in obs.pods.items()}
    instances = None if obs.instances is None else dict(obs.instances)
    for pod in plan.start_drains:
        instances[pod] = dataclasses.replace(instances[pod], is_draining=True)
    for pod in plan.cancel_drains:
        instances[pod] = dataclasses.replace(instances[pod], is_draining=False)
    return dataclasses.replace(obs, existing=existing, deployments=deployments, pods=new_pods,
                               instances=instances, status=plan.status)
