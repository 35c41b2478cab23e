"""termination_signal() and pending_notices(): which taints mean "this node goes away", by when."""
from __future__ import annotations

import pytest

from operators.ferry_operator.nodes import Signal, pending_notices, termination_signal
from operators.ferry_operator.pool_plan import PodState
from operators.ferry_operator.status import format_time

NOW = 1_700_000_000.0
ADDED = NOW - 30


def node(*taints: dict) -> dict:
    return {"metadata": {"name": "n1"}, "spec": {"taints": list(taints)}}


def taint(key: str, added: float | None = None, effect: str = "NoSchedule") -> dict:
    out = {"key": key, "value": "true", "effect": effect}
    if added is not None:
        out["timeAdded"] = format_time(added)
    return out


@pytest.mark.parametrize(("body", "expected"), [
    (node(), None),
    ({"metadata": {"name": "n1"}}, None),
    (node(taint("node.kubernetes.io/unschedulable")), None),
    (node(taint("aws-node-termination-handler/rebalance-recommendation")), None),
    (node(taint("aws-node-termination-handler/spot-itn", ADDED, "NoExecute")),
     Signal(ADDED + 120, "node-taint:aws-node-termination-handler/spot-itn")),
    (node(taint("aws-node-termination-handler/spot-itn")),           # no timeAdded (NoSchedule): from now
     Signal(NOW + 120, "node-taint:aws-node-termination-handler/spot-itn")),
    (node(taint("aws-node-termination-handler/scheduled-maintenance", ADDED)),
     Signal(ADDED + 120, "node-taint:aws-node-termination-handler/scheduled-maintenance")),
    (node(taint("cloud.google.com/impending-node-termination", ADDED)),
     Signal(ADDED + 30, "node-taint:cloud.google.com/impending-node-termination")),
    (node(taint("karpenter.sh/disrupted")), Signal(0.0, "node-taint:karpenter.sh/disrupted")),
    (node(taint("karpenter.sh/disruption")), Signal(0.0, "node-taint:karpenter.sh/disruption")),
    (node(taint("karpenter.sh/disrupted"), taint("cloud.google.com/impending-node-termination", ADDED)),
     Signal(ADDED + 30, "node-taint:cloud.google.com/impending-node-termination")),   # a known deadline wins
    (node(taint("aws-node-termination-handler/spot-itn", ADDED), taint("cloud.google.com/impending-node-termination", ADDED)),
     Signal(ADDED + 30, "node-taint:cloud.google.com/impending-node-termination")),   # the earliest wins
])
def test_termination_signal(body, expected):
    assert termination_signal(body, NOW) == expected


def test_a_malformed_time_added_counts_from_now():
    bad = {"key": "cloud.google.com/impending-node-termination", "timeAdded": "yesterday"}
    assert termination_signal(node(bad), NOW).deadline_unix_s == NOW + 30


def test_pending_notices_once_per_node_and_pod_and_never_for_terminating_pods():
    signal = Signal(NOW + 120, "node-taint:aws-node-termination-handler/spot-itn")
    pods = [PodState("decode-0", node_name="n1"), PodState("decode-1", node_name="n2"),
            PodState("decode-2", node_name="n1"), PodState("decode-3", node_name="n1", is_terminating=True)]
    notices = pending_notices(pods, {"n1": signal}, sent={("n1", "decode-2")})
    assert [(n.pod, n.node, n.signal) for n in notices] == [("decode-0", "n1", signal)]
    assert pending_notices(pods, {}, sent=set()) == ()
