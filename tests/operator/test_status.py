"""Status helpers: times, drain records, condition transitions, the merge patch, and pod/Deployment reads."""
from __future__ import annotations

import pytest

from operators.ferry_operator.kube import deployment_state, pod_state
from operators.ferry_operator.pool_plan import PodState
from operators.ferry_operator.reconcile import DeploymentState
from operators.ferry_operator.status import (
    DrainRecord,
    draining_records,
    format_time,
    invalid_spec_status,
    parse_time,
    status_patch,
)

NOW = 1_700_000_000.0


def test_time_round_trip_and_fallbacks():
    assert parse_time(format_time(NOW), 0) == NOW
    assert parse_time("2023-11-14T22:13:20+00:00", 0) == NOW
    assert parse_time(None, 5.0) == 5.0 and parse_time("soon", 5.0) == 5.0


def test_draining_records_tolerate_hand_edits():
    status = {"pools": {"decode": {"draining": [{"pod": "a", "since": format_time(NOW - 9)}, {"pod": "b"},
                                                {"since": "x"}, "junk"]}}}
    assert draining_records(status, "decode", NOW) == (DrainRecord("a", NOW - 9), DrainRecord("b", NOW))
    assert draining_records({}, "prefill", NOW) == () and draining_records(None, "decode", NOW) == ()


@pytest.mark.parametrize(("current", "new", "patch"), [
    ({}, {"observedGeneration": 2}, {"observedGeneration": 2}),
    ({"observedGeneration": 2}, {"observedGeneration": 2}, {}),
    ({"pools": {"decode": {"replicas": 2, "recommendedReplicas": 4}}}, {"pools": {"decode": {"replicas": 2}}},
     {"pools": {"decode": {"recommendedReplicas": None}}}),
    ({"pools": {"decode": {"draining": [{"pod": "a"}]}}}, {"pools": {"decode": {"draining": []}}},
     {"pools": {"decode": {"draining": []}}}),
    ({"kopf": {"x": 1}, "observedGeneration": 1}, {"observedGeneration": 1}, {}),     # not ours: left alone
])
def test_status_patch(current, new, patch):
    assert status_patch(current, new) == patch


def test_invalid_spec_status_keeps_pools_and_marks_conditions():
    previous = {"pools": {"decode": {"replicas": 2}}, "observedGeneration": 1}
    status = invalid_spec_status("spec.pools.decode: minReplicas 3 > maxReplicas 2", previous, 4, NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["pools"] == previous["pools"] and status["observedGeneration"] == 4
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "InvalidSpec")
    assert "minReplicas 3" in conditions["Degraded"]["message"] and conditions["Degraded"]["status"] == "True"
    again = invalid_spec_status("spec.pools.decode: minReplicas 3 > maxReplicas 2", status, 4, NOW + 60)
    assert status_patch(status, again) == {}


@pytest.mark.parametrize(("pod", "expected"), [
    ({"metadata": {"name": "p", "creationTimestamp": format_time(NOW)}, "spec": {"nodeName": "n"},
      "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
     PodState("p", "Running", True, False, NOW, "n")),
    ({"metadata": {"name": "p", "deletionTimestamp": format_time(NOW)},
      "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}},
     PodState("p", "Running", False, True, 0.0, "")),
    ({"metadata": {"name": "p"}}, PodState("p", "Pending", False, False, 0.0, "")),
])
def test_pod_state(pod, expected):
    assert pod_state(pod) == expected


def test_deployment_state():
    assert deployment_state({"spec": {"replicas": 3}, "status": {"readyReplicas": 2}}) == DeploymentState(3, 2)
    assert deployment_state({"spec": {"replicas": 0}, "status": {}}) == DeploymentState(0, 0)
