"""reconcile(): objects, drain-first scale-down, scale-up, status — table-driven, plus the
idempotence property (reconciling the world a plan leaves behind gives no actions, same status)."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.ferry_operator.pool_plan import InstanceLoad, PodState
from operators.ferry_operator.reconcile import reconcile
from operators.ferry_operator.status import format_time, status_patch
from tests.operator.world import (
    NOW,
    TIMEOUT,
    carry_out,
    drain_status,
    loads,
    make_spec,
    observed,
    pods,
)

DECODE = pods("decode", 3)


def _case(name, obs, **expect):
    return pytest.param(obs, expect, id=name)


def _requests(**counts):
    return loads(pods("prefill", 1) + DECODE, requests={k.replace("_", "-"): v for k, v in counts.items()})


CASES = [
    _case("settled", observed(), scale={}, start=(), delete=(), records=[], requeue=None),
    _case("scale up from the spec", observed(make_spec(decode={"replicas": 5})), scale={"decode": 5}, start=()),
    _case("scale up from the recommendation", observed(recommendations={"decode": 6}), scale={"decode": 6}),
    _case("recommendation clamped to maxReplicas", observed(recommendations={"decode": 20}), scale={"decode": 8}),
    _case("spec replicas clamped to minReplicas", observed(make_spec(prefill={"replicas": 0, "minReplicas": 2})),
          scale={"prefill": 2}),
    _case("scale down drains the fewest-requests pods first",
          observed(make_spec(decode={"replicas": 1}), instances=_requests(decode_0=5, decode_1=1, decode_2=3,
                                                                          prefill_0=1)),
          start=("decode-1", "decode-2"), delete=(), scale={}, records=["decode-1", "decode-2"]),
    _case("scale down: not-ready pods before fewer requests",
          observed(make_spec(decode={"replicas": 2}), decode=(*pods("decode", 2), PodState("decode-9", is_ready=False)),
                   instances=loads((*pods("decode", 2), PodState("decode-9")), requests=4)),
          start=("decode-9",), records=["decode-9"]),
    _case("scale down: newest pod on a tie", observed(make_spec(decode={"replicas": 2})),
          start=("decode-2",), records=["decode-2"]),
    _case("a pending victim goes at once (it never ran)",
          observed(decode=(*DECODE, PodState("decode-3", phase="Pending", is_ready=False)), replicas={"decode": 4}),
          delete=("decode-3",), scale={"decode": 3}, records=[]),
    _case("an idle victim goes at once (drained and deleted in one plan)",
          observed(make_spec(decode={"replicas": 2}), instances=_requests(decode_0=3, decode_1=3, decode_2=0)),
          start=("decode-2",), delete=("decode-2",), scale={"decode": 2}, records=[]),
    _case("drain finished: 0 requests → delete the pod and lower replicas",
          observed(make_spec(decode={"replicas": 2}), status=drain_status("decode", ("decode-1", NOW - 10)),
                   instances=loads(DECODE, requests={"decode-0": 2, "decode-2": 2}, draining=("decode-1",))),
          start=(), delete=("decode-1",), scale={"decode": 2}, records=[], timed_out=()),
    _case("drain under way: wait",
          observed(make_spec(decode={"replicas": 2}), status=drain_status("decode", ("decode-1", NOW - 10)),
                   instances=loads(DECODE, requests=3, draining=("decode-1",))),
          start=(), delete=(), scale={}, records=["decode-1"], requeue=1.0, progressing="Draining"),
    _case("drain timeout: delete anyway",
          observed(make_spec(decode={"replicas": 2}), status=drain_status("decode", ("decode-1", NOW - TIMEOUT - 1)),
                   instances=loads(DECODE, requests=3, draining=("decode-1",))),
          delete=("decode-1",), scale={"decode": 2}, records=[], timed_out=("decode-1",)),
    _case("victim unknown to the scheduler: done",
          observed(make_spec(decode={"replicas": 2}), status=drain_status("decode", ("decode-1", NOW - 5)),
                   instances=loads((DECODE[0], DECODE[2]), requests=3)),
          delete=("decode-1",), scale={"decode": 2}, records=[]),
    _case("recorded drain lost by the scheduler: sent again",
          observed(make_spec(decode={"replicas": 2}), status=drain_status("decode", ("decode-1", NOW - 5)),
                   instances=loads(DECODE, requests=3)),
          start=("decode-1",), delete=(), records=["decode-1"]),
    _case("pool grew back: cancel the drain",
          observed(status=drain_status("decode", ("decode-2", NOW - 5)),
                   instances=loads(pods("prefill", 1) + DECODE, requests=3, draining=("decode-2",))),
          cancel=("decode-2",), scale={}, records=[]),
    _case("pool grew past its size: cancel and scale up",
          observed(make_spec(decode={"replicas": 4}), status=drain_status("decode", ("decode-2", NOW - 5)),
                   instances=loads(pods("prefill", 1) + DECODE, requests=3, draining=("decode-2",))),
          cancel=("decode-2",), scale={"decode": 4}, records=[]),
    _case("scheduler unreachable: no new drain, requeue",
          observed(make_spec(decode={"replicas": 1}), instances=None),
          start=(), delete=(), scale={}, records=[], requeue=1.0, degraded="SchedulerUnreachable"),
    _case("scheduler unreachable: scale-up still happens",
          observed(make_spec(decode={"replicas": 4}), instances=None), scale={"decode": 4}),
    _case("scheduler unreachable: a drain past its timeout still ends",
          observed(make_spec(decode={"replicas": 2}), instances=None,
                   status=drain_status("decode", ("decode-1", NOW - TIMEOUT))),
          delete=("decode-1",), scale={"decode": 2}, timed_out=("decode-1",)),
    _case("scheduler unreachable: a drain to cancel waits for it",
          observed(instances=None, status=drain_status("decode", ("decode-2", NOW - 5))),
          cancel=(), delete=(), scale={}, records=["decode-2"]),
    _case("replicas without pods are dropped first, no drain",
          observed(make_spec(decode={"replicas": 1}), decode=pods("decode", 1), replicas={"decode": 3}),
          start=(), delete=(), scale={"decode": 1}, records=[]),
    _case("terminating pods are never victims",
          observed(make_spec(decode={"replicas": 2}),
                   decode=(*pods("decode", 2), PodState("decode-5", is_terminating=True, is_ready=False)),
                   replicas={"decode": 3}),
          start=(), scale={"decode": 2}),
    _case("record of a pod that is gone is dropped",
          observed(status=drain_status("decode", ("decode-7", NOW - 5))), records=[], start=(), delete=()),
]


@pytest.mark.parametrize(("obs", "expect"), CASES)
def test_reconcile_table(obs, expect):
    plan = reconcile(obs)
    got = {"scale": dict(plan.scale), "start": plan.start_drains, "cancel": plan.cancel_drains,
           "delete": plan.delete_pods, "timed_out": plan.timed_out, "requeue": plan.requeue_after,
           "records": [r["pod"] for pool in ("prefill", "decode") for r in plan.status["pools"][pool]["draining"]]}
    conditions = {c["type"]: c for c in plan.status["conditions"]}
    got["progressing"] = conditions["Progressing"]["reason"]
    got["degraded"] = conditions["Degraded"]["reason"]
    assert {k: got[k] for k in expect} == expect


@pytest.mark.parametrize(("obs", "expect"), CASES)
def test_reconcile_is_idempotent_on_its_own_result(obs, expect):
    plan = reconcile(obs)
    again = reconcile(carry_out(obs, plan))
    assert not again.has_actions, again
    assert status_patch(plan.status, again.status) == {}


def test_new_drains_are_recorded_with_the_time_they_began():
    plan = reconcile(observed(make_spec(decode={"replicas": 2})))
    assert plan.status["pools"]["decode"]["draining"] == [{"pod": "decode-2", "since": format_time(NOW)}]
    assert plan.status["pools"]["decode"]["replicas"] == 3 and plan.status["pools"]["decode"]["desiredReplicas"] == 2


def test_drift_reapplies_only_the_changed_object():
    obs = observed()
    existing = {**obs.existing, ("Deployment", "demo-gateway"): "stale"}
    existing.pop(("ConfigMap", "demo-config"))
    plan = reconcile(dataclasses.replace(obs, existing=existing))
    assert sorted((o["kind"], o["metadata"]["name"]) for o in plan.apply) == [
        ("ConfigMap", "demo-config"), ("Deployment", "demo-gateway")]


def test_reapplied_pool_deployment_keeps_its_live_replicas():
    obs = observed(replicas={"decode": 5}, decode=pods("decode", 5))
    existing = {**obs.existing, ("Deployment", "demo-decode"): "stale"}
    plan = reconcile(dataclasses.replace(obs, existing=existing))
    (dep,) = plan.apply
    assert dep["spec"]["replicas"] == 5        # lowered later, after drains, by plan.scale
    assert plan.start_drains == ("decode-4", "decode-3")


def test_new_pool_deployment_starts_at_the_desired_size():
    obs = observed(recommendations={"decode": 4})
    existing = dict(obs.existing)
    existing.pop(("Deployment", "demo-decode"))
    obs = dataclasses.replace(obs, existing=existing, deployments={k: v for k, v in obs.deployments.items()
                                                                   if k != "decode"})
    plan = reconcile(obs)
    assert [o["spec"]["replicas"] for o in plan.apply] == [4]
    assert plan.scale == {} and plan.status["pools"]["decode"]["replicas"] == 4


def test_objects_no_longer_rendered_are_pruned():
    spec = make_spec()
    obs = observed(spec)
    no_kvstore = dataclasses.replace(spec, kvstore=dataclasses.replace(spec.kvstore, enabled=False))
    plan = reconcile(dataclasses.replace(observed(no_kvstore), existing=obs.existing))
    assert plan.prune == (("Deployment", "demo-kvstore"), ("Service", "demo-kvstore"))


@pytest.mark.parametrize(("ready", "status", "reason"), [
    ({}, "True", "Serving"),
    ({"scheduler": 0}, "False", "ComponentsNotReady"),
    ({"decode": 0}, "False", "ComponentsNotReady"),
    ({"kvstore": 0, "gateway": 0}, "False", "ComponentsNotReady"),
])
def test_ready_condition(ready, status, reason):
    plan = reconcile(observed(ready=ready))
    cond = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == (status, reason, 3)
    assert plan.status["observedGeneration"] == 3


def test_condition_keeps_its_transition_time_while_its_status_holds():
    first = reconcile(observed(ready={"decode": 0}))
    later = reconcile(observed(ready={"decode": 1}, status=first.status, now=NOW + 50))
    ready = {c["type"]: c for c in later.status["conditions"]}
    before = {c["type"]: c for c in first.status["conditions"]}
    assert ready["Ready"]["status"] == "True" and ready["Ready"]["lastTransitionTime"] == format_time(NOW + 50)
    assert ready["Degraded"]["lastTransitionTime"] == before["Degraded"]["lastTransitionTime"] == format_time(NOW)
    assert ready["Progressing"]["status"] == "True"     # decode 1/3 ready: still rolling out
    assert ready["Progressing"]["lastTransitionTime"] == format_time(NOW)


# --- property: any world, one plan, then a fixed point ------------------------------------------------

@st.composite
def worlds(draw):
    n = draw(st.integers(0, 6))
    decode = []
    for i in range(n):
        phase = draw(st.sampled_from(["Running", "Running", "Pending"]))
        decode.append(PodState(f"decode-{i}", phase=phase, is_ready=phase == "Running" and draw(st.booleans()),
                               is_terminating=draw(st.booleans()) and draw(st.booleans()), created_at=NOW - 100 + i))
    reachable = draw(st.booleans())
    instances = {p.name: InstanceLoad(draw(st.integers(0, 3)), draw(st.booleans())) for p in decode
                 if draw(st.integers(0, 4)) > 0} if reachable else None
    recorded = draw(st.lists(st.sampled_from([p.name for p in decode] + ["gone"]), unique=True, max_size=3))
    status = drain_status("decode", *((pod, NOW - draw(st.integers(0, 2 * TIMEOUT))) for pod in recorded))
    spec = make_spec(decode={"replicas": draw(st.integers(0, 6)), "minReplicas": draw(st.integers(0, 2))})
    rec = draw(st.one_of(st.none(), st.integers(0, 9)))
    return observed(spec, decode=decode, replicas={"decode": draw(st.integers(0, 7))}, instances=instances,
                    status=status, recommendations={"decode": rec} if rec is not None else {})


@settings(max_examples=600, deadline=None)
@given(worlds())
def test_property_one_plan_reaches_a_fixed_point(obs):
    plan = reconcile(obs)
    again = reconcile(carry_out(obs, plan))
    assert not again.has_actions, (plan, again)
    assert status_patch(plan.status, again.status) == {}


@settings(max_examples=600, deadline=None)
@given(worlds())
def test_property_scale_down_never_undershoots_and_only_removes_live_pods(obs):
    plan = reconcile(obs)
    current = obs.deployments["decode"].replicas
    desired = plan.status["pools"]["decode"]["desiredReplicas"]
    after = plan.scale.get("decode", current)
    live = {p.name for p in obs.pods["decode"] if not p.is_terminating}
    assert set(plan.delete_pods) <= live
    if current >= desired:
        assert desired <= after <= current
        assert len(plan.delete_pods) <= current - after
    else:
        assert after == desired and not plan.delete_pods
    if obs.instances is None:
        assert not plan.start_drains and not plan.cancel_drains
    else:
        assert set(plan.start_drains) <= set(obs.instances)
