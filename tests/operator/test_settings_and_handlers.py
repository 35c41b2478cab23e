"""OperatorSettings from FERRY_OPERATOR_* env and flags, the liveness endpoint, and the order in which
the handlers carry out a plan (each step must be safe to interrupt: see pool_plan.py)."""
from __future__ import annotations

import logging

import pytest

from operators.ferry_operator import handlers
from operators.ferry_operator.__main__ import liveness_endpoint
from operators.ferry_operator.names import ClusterRef
from operators.ferry_operator.reconcile import Plan
from operators.ferry_operator.scheduler_client import SchedulerUnavailable
from operators.ferry_operator.settings import OperatorSettings, load_settings


def test_env_and_flags(monkeypatch):
    monkeypatch.setenv("FERRY_OPERATOR_NAMESPACE", "serving")
    monkeypatch.setenv("FERRY_OPERATOR_BIND_POD_IP", "true")
    monkeypatch.setenv("FERRY_OPERATOR_RESYNC_SECONDS", "5")
    s = load_settings(["--worker-image", "w:2", "--drain-poll-seconds", "0.5"])
    assert (s.namespace, s.bind_pod_ip, s.resync_seconds, s.worker_image) == ("serving", True, 5.0, "w:2")
    assert s.tick_seconds == 0.5
    assert s.scheduler_address_of("demo", "ns") == "demo-scheduler.ns.svc:50050"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scheduler_address": "{cluster}:50050"}, "only {name} and {namespace}"),
    ({"resync_seconds": 0}, "must be > 0"),
    ({"health_port": 70000}, "health_port"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        OperatorSettings(**kwargs)


@pytest.mark.parametrize(("kwargs", "pod_ip", "expected"), [
    ({}, "10.1.2.3", "http://0.0.0.0:8080/healthz"),
    ({"bind_pod_ip": True}, "10.1.2.3", "http://10.1.2.3:8080/healthz"),
    ({"bind_pod_ip": True}, None, "http://0.0.0.0:8080/healthz"),
    ({"health_port": -1}, None, None),
])
def test_liveness_endpoint(kwargs, pod_ip, expected):
    assert liveness_endpoint(OperatorSettings(**kwargs), pod_ip) == expected


class Recorder:
    """Fake Kube and SchedulerClient writing every call into one list."""

    def __init__(self, failing_drains=()):
        self.calls: list[tuple] = []
        self.failing_drains = set(failing_drains)

    def apply(self, obj):
        self.calls.append(("apply", obj["metadata"]["name"]))

    def delete(self, namespace, key):
        self.calls.append(("prune", key))

    def patch_status(self, ref, patch):
        self.calls.append(("status", patch))

    def delete_pod(self, namespace, name):
        self.calls.append(("delete", name))

    def scale(self, ref, pool, replicas):
        self.calls.append(("scale", pool, replicas))

    async def drain(self, pod, cancel=False):
        if pod in self.failing_drains:
            raise SchedulerUnavailable("down")
        self.calls.append(("cancel" if cancel else "drain", pod))
        return 0


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(handlers.RUNTIME, "kube", rec)
    return rec


PLAN = Plan(apply=({"kind": "ConfigMap", "metadata": {"name": "demo-config"}},), prune=(("Service", "demo-kvstore"),),
            start_drains=("decode-2", "decode-3"), cancel_drains=("prefill-1",), delete_pods=("decode-3",),
            scale={"decode": 2}, status={"observedGeneration": 2})


async def test_execute_order(recorder):
    await handlers.execute(ClusterRef("demo", "ns"), PLAN, {}, recorder, logging.getLogger("test"))
    assert recorder.calls == [
        ("apply", "demo-config"), ("prune", ("Service", "demo-kvstore")),
        ("cancel", "prefill-1"),                       # before its record leaves the status
        ("status", {"observedGeneration": 2}),         # new records before their drains begin
        ("drain", "decode-2"), ("drain", "decode-3"),
        ("delete", "decode-3"), ("scale", "decode", 2)]   # the pod goes before the replica count drops


async def test_execute_skips_an_unchanged_status_and_survives_a_failed_drain(recorder):
    recorder.failing_drains = {"decode-2"}
    await handlers.execute(ClusterRef("demo", "ns"), PLAN, {"observedGeneration": 2}, recorder, logging.getLogger("t"))
    assert not [c for c in recorder.calls if c[0] == "status"]
    assert ("drain", "decode-3") in recorder.calls and ("scale", "decode", 2) in recorder.calls


async def test_a_failed_cancel_stops_before_the_status(recorder):
    recorder.failing_drains = {"prefill-1"}
    with pytest.raises(SchedulerUnavailable):
        await handlers.execute(ClusterRef("demo", "ns"), PLAN, {}, recorder, logging.getLogger("t"))
    assert [c[0] for c in recorder.calls] == ["apply", "prune"]
