"""The clouds' metadata answers read into preemption notices (services/worker/cloud_notices.py): table
tests, malformed answers included."""
from __future__ import annotations

import json

import pytest

from services.worker import cloud_notices as cn
from services.worker.cloud_notices import CloudNotice, MalformedDocument
from tests.worker.fake_metadata import AZURE_VM, azure_events

AZURE_NOT_BEFORE = "Wed, 02 Dec 2026 09:00:00 GMT"
DEADLINE_UNIX_S = 1796202000.0          # 2026-12-02T09:00:00Z


def js(doc) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("status, body, expected", [
    (404, b"", None),
    (200, js({"action": "terminate", "time": "2026-12-02T09:00:00Z"}),
     CloudNotice("aws:terminate:2026-12-02T09:00:00Z", DEADLINE_UNIX_S, "spot terminate")),
    (200, js({"action": "stop", "time": "2026-12-02T09:00:00+00:00"}),
     CloudNotice("aws:stop:2026-12-02T09:00:00+00:00", DEADLINE_UNIX_S, "spot stop")),
    (200, js({"action": "hibernate", "time": "2026-12-02T10:00:00+01:00"}),
     CloudNotice("aws:hibernate:2026-12-02T10:00:00+01:00", DEADLINE_UNIX_S, "spot hibernate")),
], ids=["none", "terminate", "stop", "hibernate-offset"])
def test_preempt_aws_instance_action(status, body, expected):
    assert cn.parse_aws_instance_action(status, body) == expected


@pytest.mark.parametrize("status, body", [
    (500, b"oops"),
    (200, b"{not json"),
    (200, b"[]"),
    (200, js({"action": "reboot", "time": "2026-12-02T09:00:00Z"})),
    (200, js({"action": "terminate"})),
    (200, js({"action": "terminate", "time": "tomorrow"})),
    (200, js({"action": "terminate", "time": "2026-12-02T09:00:00"})),      # no time zone
    (200, b"\xff\xfe"),
], ids=["5xx", "not-json", "not-object", "unknown-action", "no-time", "bad-time", "naive-time", "not-utf8"])
def test_preempt_aws_instance_action_malformed(status, body):
    with pytest.raises(MalformedDocument):
        cn.parse_aws_instance_action(status, body)


@pytest.mark.parametrize("status, body, expected", [
    (404, b"", None),
    (200, js({"noticeTime": "2026-12-02T08:50:00Z"}), "2026-12-02T08:50:00Z"),
])
def test_preempt_aws_rebalance_is_read_but_is_no_notice(status, body, expected):
    assert cn.parse_aws_rebalance(status, body) == expected


@pytest.mark.parametrize("body, expected", [
    (b"FALSE", None),
    (b"TRUE", CloudNotice("gcp:preempted", None, "preempted")),
    (b"TRUE\n", CloudNotice("gcp:preempted", None, "preempted")),
])
def test_preempt_gcp_preempted(body, expected):
    assert cn.parse_gcp_preempted(body) == expected


@pytest.mark.parametrize("body", [b"", b"true-ish", b"<html>", b"\xff"])
def test_preempt_gcp_preempted_malformed(body):
    with pytest.raises(MalformedDocument):
        cn.parse_gcp_preempted(body)


@pytest.mark.parametrize("body, is_notice", [
    (b"NONE", False), (b"MIGRATE_ON_HOST_MAINTENANCE", False), (b"TERMINATE_ON_HOST_MAINTENANCE", True)])
def test_preempt_gcp_maintenance_terminate_only(body, is_notice):
    notice = cn.parse_gcp_maintenance_event(body)
    assert (notice is not None) == is_notice
    if is_notice:
        assert notice.deadline_unix_s is None and notice.key == "gcp:maintenance"


def test_preempt_gcp_maintenance_malformed():
    with pytest.raises(MalformedDocument):
        cn.parse_gcp_maintenance_event(b"REBOOT_SOMETIME")


def event(event_type: str, resources: list[str], not_before: str = AZURE_NOT_BEFORE, event_id: str = "e") -> dict:
    return {"EventId": event_id, "EventType": event_type, "Resources": resources, "NotBefore": not_before}


@pytest.mark.parametrize("events, vm_name, expected", [
    ([], AZURE_VM, None),
    (azure_events("Preempt", AZURE_NOT_BEFORE)["Events"], AZURE_VM,
     CloudNotice("azure:C7061BAC-AFDC-4513-B24B-AA5F13A16123", DEADLINE_UNIX_S, "Preempt")),
    ([event("Terminate", [AZURE_VM])], AZURE_VM, CloudNotice("azure:e", DEADLINE_UNIX_S, "Terminate")),
    ([event("Preempt", ["other_vm"])], AZURE_VM, None),                        # a neighbour's eviction
    ([event("Preempt", ["other_vm"])], "", CloudNotice("azure:e", DEADLINE_UNIX_S, "Preempt")),   # no filter
    ([event("Reboot", [AZURE_VM]), event("Freeze", [AZURE_VM]), event("Redeploy", [AZURE_VM])], AZURE_VM, None),
    ([event("Preempt", [AZURE_VM], not_before="")], AZURE_VM, CloudNotice("azure:e", None, "Preempt")),
    ([event("Terminate", [AZURE_VM], "Wed, 02 Dec 2026 09:15:00 GMT", "late"),
      event("Preempt", [AZURE_VM], AZURE_NOT_BEFORE, "early")], AZURE_VM,
     CloudNotice("azure:early", DEADLINE_UNIX_S, "Preempt")),
], ids=["no-events", "preempt", "terminate", "other-vm", "no-name-filter", "not-terminations", "started",
        "earliest"])
def test_preempt_azure_scheduled_events(events, vm_name, expected):
    assert cn.parse_azure_scheduled_events(js({"DocumentIncarnation": 1, "Events": events}), vm_name) == expected


@pytest.mark.parametrize("body", [
    b"[1, 2", b"[]", js({"DocumentIncarnation": 1}), js({"Events": "none"}), js({"Events": [1]}),
    js({"Events": [{"EventType": "Preempt", "Resources": "vm"}]}),
    js({"Events": [event("Preempt", [AZURE_VM], not_before="next week")]}),
], ids=["not-json", "not-object", "no-events", "events-not-list", "event-not-object", "resources-not-list",
        "bad-not-before"])
def test_preempt_azure_scheduled_events_malformed(body):
    with pytest.raises(MalformedDocument):
        cn.parse_azure_scheduled_events(body, AZURE_VM)
