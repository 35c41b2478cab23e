"""Reading the clouds' instance-metadata answers into preemption notices (pure: no I/O, no clock).

    cloud  document                                          a notice when                       deadline
    AWS    /latest/meta-data/spot/instance-action (JSON)     200 {"action": terminate|stop|      its "time"
                                                             hibernate, "time": ISO 8601}        (~2 min ahead)
    GCP    /computeMetadata/v1/instance/preempted (text)     "TRUE"                              none given
    GCP    /computeMetadata/v1/instance/maintenance-event    "TERMINATE_ON_HOST_MAINTENANCE"     none given
    Azure  /metadata/scheduledevents (JSON)                  an event of type Preempt or         its "NotBefore"
                                                             Terminate naming this VM            (RFC 1123)

Where the cloud gives no time the parser says so (`deadline_unix_s` None) and the watcher dates the
notice from when it first saw it (preemption_watch.py). Anything that is not one of the documented
shapes raises `MalformedDocument`: the watcher counts it and keeps polling.

Deliberately not notices: AWS's rebalance recommendation (an elevated risk, not a termination: read
by `parse_aws_rebalance` for the log only), GCP's MIGRATE_ON_HOST_MAINTENANCE (a live migration keeps
the VM), Azure's Freeze, Reboot and Redeploy (the VM comes back; the worker restarts and registers again).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

AWS_ACTIONS = ("terminate", "stop", "hibernate")
AZURE_EVENT_TYPES = ("Preempt", "Terminate")
GCP_TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"
GCP_MAINTENANCE_VALUES = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", GCP_TERMINATE)


class MalformedDocument(ValueError):
    """A metadata answer that is not one of the shapes the cloud documents."""


@dataclass(frozen=True, slots=True)
class CloudNotice:
    """One termination the cloud announced for this machine."""
    key: str                            # the same notice polled again has the same key
    deadline_unix_s: float | None       # when the machine goes away; None: the cloud gave no time
    reason: str                         # for the log: "spot terminate", "Preempt", ...


def parse_aws_instance_action(status: int, body: bytes) -> CloudNotice | None:
    """AWS IMDS `spot/instance-action`: 404 while there is none, else the action and its time."""
    if status == 404:
        return None
    if status != 200:
        raise MalformedDocument(f"instance-action answered HTTP {status}")
    doc = _json_object(body)
    action, when = doc.get("action"), doc.get("time")
    if action not in AWS_ACTIONS:
        raise MalformedDocument(f"instance-action: action {action!r} is not one of {', '.join(AWS_ACTIONS)}")
    deadline = _iso8601(when)
    return CloudNotice(key=f"aws:{action}:{when}", deadline_unix_s=deadline, reason=f"spot {action}")


def parse_aws_rebalance(status: int, body: bytes) -> str | None:
    """AWS IMDS `events/recommendations/rebalance`: its notice time, or None (404). Log-only."""
    if status == 404:
        return None
    if status != 200:
        raise MalformedDocument(f"rebalance recommendation answered HTTP {status}")
    when = _json_object(body).get("noticeTime")
    if not isinstance(when, str):
        raise MalformedDocument("rebalance recommendation has no noticeTime")
    return when


def parse_gcp_preempted(body: bytes) -> CloudNotice | None:
    """GCP `instance/preempted`: TRUE once the VM is being preempted (about 30 s left, no time given)."""
    value = _text(body)
    if value == "FALSE":
        return None
    if value != "TRUE":
        raise MalformedDocument(f"preempted is {value[:40]!r}, not TRUE or FALSE")
    return CloudNotice(key="gcp:preempted", deadline_unix_s=None, reason="preempted")


def parse_gcp_maintenance_event(body: bytes) -> CloudNotice | None:
    """GCP `instance/maintenance-event`: TERMINATE_ON_HOST_MAINTENANCE means the VM stops (GPU VMs get
    an hour's notice, others 60 s; no time given). NONE and MIGRATE_ON_HOST_MAINTENANCE keep it."""
    value = _text(body)
    if value not in GCP_MAINTENANCE_VALUES:
        raise MalformedDocument(f"maintenance-event is {value[:40]!r}, not one of {', '.join(GCP_MAINTENANCE_VALUES)}")
    if value != GCP_TERMINATE:
        return None
    return CloudNotice(key="gcp:maintenance", deadline_unix_s=None, reason="host maintenance (terminate)")


def parse_azure_scheduled_events(body: bytes, vm_name: str) -> CloudNotice | None:
    """Azure Scheduled Events: the earliest Preempt or Terminate event whose Resources name `vm_name`
    (every such event when `vm_name` is empty). Events go to every VM of an availability set or scale
    set, hence the name. An empty NotBefore (the event has started) counts as no time given."""
    doc = _json_object(body)
    events = doc.get("Events")
    if not isinstance(events, list):
        raise MalformedDocument("scheduled events: no Events list")
    notices = []
    for event in events:
        if not isinstance(event, dict):
            raise MalformedDocument("scheduled events: an event is not an object")
        resources = event.get("Resources", [])
        if not isinstance(resources, list):
            raise MalformedDocument("scheduled events: Resources is not a list")
        if event.get("EventType") not in AZURE_EVENT_TYPES or (vm_name and vm_name not in resources):
            continue
        not_before = event.get("NotBefore") or ""
        notices.append(CloudNotice(key=f"azure:{event.get('EventId', '')}",
                                   deadline_unix_s=_rfc1123(not_before) if not_before else None,
                                   reason=str(event["EventType"])))
    return min(notices, key=lambda n: float("inf") if n.deadline_unix_s is None else n.deadline_unix_s,
               default=None)


def _json_object(body: bytes) -> dict:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedDocument(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise MalformedDocument(f"not a JSON object: {type(doc).__name__}")
    return doc


def _text(body: bytes) -> str:
    try:
        return body.decode().strip()
    except UnicodeDecodeError:
        raise MalformedDocument("not UTF-8 text") from None


def _iso8601(value: object) -> float:
    if not isinstance(value, str):
        raise MalformedDocument(f"time {value!r} is not a string")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedDocument(f"time {value!r} is not ISO 8601") from None
    if when.tzinfo is None:
        raise MalformedDocument(f"time {value!r} has no time zone")
    return when.timestamp()


def _rfc1123(value: object) -> float:
    if not isinstance(value, str):
        raise MalformedDocument(f"NotBefore {value!r} is not a string")
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise MalformedDocument(f"NotBefore {value!r} is not an RFC 1123 date") from None
    return when.replace(tzinfo=when.tzinfo or UTC).timestamp()
