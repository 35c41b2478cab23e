"""The InferenceCluster's status: conditions (Ready/Progressing/Degraded) and drain records (pure).

Times are unix seconds inside the operator and RFC 3339 in the status. A condition keeps its
lastTransitionTime while its status (True/False/Unknown) stays the same, as Kubernetes conditions do.
"""
from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


@dataclass(frozen=True, slots=True)
class DrainRecord:
    """A pod chosen for removal; `since` is when its drain began (the timeout counts from it)."""
    pod: str
    since: float

    def to_status(self) -> dict:
        return {"pod": self.pod, "since": format_time(self.since)}


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: bool | None        # None: Unknown
    reason: str
    message: str

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else str(self.status)


def format_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None, default: float) -> float:
    """RFC 3339 → unix seconds; `default` when missing or unreadable (a hand-edited status)."""
    if not text:
        return default
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return default


def draining_records(status: Mapping[str, Any] | None, pool: str, now: float) -> tuple[DrainRecord, ...]:
    """status.pools.<pool>.draining as records (a restarted operator resumes these drains)."""
    pools = (status or {}).get("pools") or {}
    items = (pools.get(pool) or {}).get("draining") or []
    return tuple(DrainRecord(pod=i["pod"], since=parse_time(i.get("since"), now))
                 for i in items if isinstance(i, Mapping) and i.get("pod"))


def conditions_status(new: Sequence[Condition], previous: Sequence[Mapping[str, Any]] | None,
                      generation: int, now: float) -> list[dict]:
    """The status.conditions list: `new`, with lastTransitionTime carried over where status is unchanged."""
    before = {c.get("type"): c for c in previous or () if isinstance(c, Mapping)}
    out = []
    for c in new:
        old = before.get(c.type)
        kept = old is not None and old.get("status") == c.status_text and old.get("lastTransitionTime")
        out.append({"type": c.type, "status": c.status_text, "reason": c.reason, "message": c.message,
                    "lastTransitionTime": old["lastTransitionTime"] if kept else format_time(now),
                    "observedGeneration": generation})
    return out


def invalid_spec_status(error: str, previous: Mapping[str, Any] | None, generation: int, now: float) -> dict:
    """The status of a cluster whose spec the operator cannot use: nothing is changed until it is fixed."""
    conditions = [Condition("Ready", False, "InvalidSpec", error),
                  Condition("Progressing", False, "InvalidSpec", "fix the spec; the workloads are left as they are"),
                  Condition("Degraded", True, "InvalidSpec", error)]
    old = dict(previous or {})
    return {**old, "observedGeneration": generation,
            "conditions": conditions_status(conditions, old.get("conditions"), generation, now)}


OWN_KEYS = ("observedGeneration", "pools", "conditions")


def status_patch(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict:
    """The JSON merge patch that turns the operator's part of `current` into `new` ({} when equal).
    Keys outside OWN_KEYS are left alone; keys of ours that `new` lacks are removed (null)."""
    ours = {k: v for k, v in (current or {}).items() if k in OWN_KEYS}
    return _merge_patch(ours, {k: v for k, v in new.items() if k in OWN_KEYS})


def _merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict:
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = _merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif before != value or key not in old:
            patch[key] = value
    return patch
