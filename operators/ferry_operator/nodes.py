"""Spot-termination signals on Nodes → preemption notices for the Ferry workers on them (pure).

    taint key                                               who                       deadline
    aws-node-termination-handler/spot-itn                   AWS NTH, spot interruption  timeAdded + 120 s
    aws-node-termination-handler/scheduled-maintenance      AWS NTH, scheduled event    timeAdded + 120 s
    karpenter.sh/disrupted, karpenter.sh/disruption         Karpenter (v1, pre-v1)      unknown (0)
    cloud.google.com/impending-node-termination             GKE graceful shutdown       timeAdded + 30 s

`aws-node-termination-handler/rebalance-recommendation` is deliberately not a signal: a rebalance
recommendation says the interruption risk went up, not that the node goes away; draining on it would
shrink the pool on every hint. NTH taints spot-itn when the interruption actually comes.
The API server sets a taint's timeAdded only for NoExecute taints; without it the deadline counts
from `now` (when the operator first saw the taint is the caller's business: it passes `now`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from operators.ferry_operator.pool_plan import PodState
from operators.ferry_operator.status import parse_time

AWS_GRACE_S, GKE_GRACE_S = 120.0, 30.0
TERMINATION_TAINTS: Mapping[str, float | None] = {     # key → grace in seconds (None: deadline unknown)
    "aws-node-termination-handler/spot-itn": AWS_GRACE_S,
    "aws-node-termination-handler/scheduled-maintenance": AWS_GRACE_S,
    "karpenter.sh/disrupted": None,
    "karpenter.sh/disruption": None,
    "cloud.google.com/impending-node-termination": GKE_GRACE_S,
}


@dataclass(frozen=True, slots=True)
class Signal:
    """A node is going away: by `deadline_unix_s` (0: unknown), as `source` ("node-taint:<key>") says."""
    deadline_unix_s: float
    source: str


@dataclass(frozen=True, slots=True)
class Notice:
    """One NotifyPreemption to send: the worker pod `pod` (its instance id) on `node`."""
    pod: str
    node: str
    signal: Signal


def termination_signal(node: Mapping, now: float) -> Signal | None:
    """The node's termination signal, or None. With several taints the earliest known deadline wins."""
    signals = []
    for taint in (node.get("spec") or {}).get("taints") or []:
        key = taint.get("key")
        if key not in TERMINATION_TAINTS:
            continue
        grace = TERMINATION_TAINTS[key]
        deadline = 0.0 if grace is None else parse_time(taint.get("timeAdded"), now) + grace
        signals.append(Signal(deadline_unix_s=deadline, source=f"node-taint:{key}"))
    if not signals:
        return None
    return min(signals, key=lambda s: (s.deadline_unix_s == 0, s.deadline_unix_s, s.source))


def pending_notices(pods: Iterable[PodState], signals: Mapping[str, Signal],
                    sent: AbstractSet[tuple[str, str]]) -> tuple[Notice, ...]:
    """Notices for pods on signalled nodes, except those already sent (each (node, pod) once)."""
    return tuple(Notice(pod=p.name, node=p.node_name, signal=signals[p.node_name]) for p in pods
                 if p.node_name in signals and not p.is_terminating and (p.node_name, p.name) not in sent)
