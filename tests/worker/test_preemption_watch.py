"""The preemption watcher (services/worker/preemption_watch.py) and its metadata probes against the
fake loopback metadata service, with a recording gRPC Scheduler on loopback to deliver to."""
from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.worker.metadata_probes import ERROR_KINDS, make_probe
from services.worker.metrics import PreemptionMetrics
from services.worker.preemption_watch import PreemptionWatch, WatchConfig
from tests.worker.fake_metadata import AWS_TOKEN, FakeMetadata


@pytest.fixture
def metadata():
    fake = FakeMetadata()
    yield fake
    fake.close()


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Fails the first `num_failures` NotifyPreemption calls with `code`, then takes them."""

    def __init__(self, num_failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.num_failures, self.code = num_failures, code
        self.notices: list[scheduler_pb2.PreemptionNotice] = []
        self.num_calls = 0

    async def NotifyPreemption(self, request, context):
        self.num_calls += 1
        if self.num_calls <= self.num_failures:
            await context.abort(self.code, "not now")
        self.notices.append(request)
        return scheduler_pb2.DrainInstanceReply(num_requests=3)


async def serve(servicer: RecordingScheduler) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def watch_of(cloud: str, url: str, address: str = "127.0.0.1:1", **kw) -> PreemptionWatch:
    probe = make_probe(cloud, url)
    config = WatchConfig(instance_id="decode-0", scheduler_address=address, poll_s=kw.get("poll_s", 0.05),
                         grace_s=kw.get("grace_s", 30.0))
    return PreemptionWatch(probe, config, PreemptionMetrics(probe.source, ERROR_KINDS))


def samples(metrics: PreemptionMetrics) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(metrics)
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#") and "_created" not in line}


@pytest.mark.parametrize("cloud, source, is_dated", [
    ("aws", "aws-metadata", True),
    ("gcp", "gcp-metadata", False),             # no time given: first seen + grace
    ("azure", "azure-metadata", True),
])
async def test_preempt_watch_sees_a_notice_once(metadata, cloud, source, is_dated):
    watch = watch_of(cloud, metadata.url, grace_s=30.0)
    async with httpx.AsyncClient(timeout=0.5) as http:
        assert await watch.poll(http) is None
        metadata.mode = "notice"
        started = time.time()
        notice = await watch.poll(http)
        assert notice is not None
        assert await watch.poll(http) is None              # the same notice again: not new
    seen = watch.deadlines[notice.key]
    if is_dated:
        assert seen == metadata.deadline_unix_s
    else:
        assert started + 30 <= seen <= time.time() + 30
    values = samples(watch.metrics)
    assert values[f'ferry_worker_preemption_notices_total{{source="{source}"}}'] == 1
    assert values["ferry_worker_preemption_deadline_timestamp_seconds"] == seen
    assert sum(v for k, v in values.items() if "poll_errors" in k) == 0


async def test_preempt_gcp_host_maintenance_terminate_is_a_notice(metadata):
    watch = watch_of("gcp", metadata.url, grace_s=60.0)
    async with httpx.AsyncClient(timeout=0.5) as http:
        metadata.gcp_maintenance = "MIGRATE_ON_HOST_MAINTENANCE"
        assert await watch.poll(http) is None
        metadata.gcp_maintenance = "TERMINATE_ON_HOST_MAINTENANCE"
        notice = await watch.poll(http)
    assert notice is not None and notice.key == "gcp:maintenance"


async def test_preempt_aws_uses_imdsv2_and_keeps_its_token(metadata):
    watch = watch_of("aws", metadata.url)
    async with httpx.AsyncClient(timeout=0.5) as http:
        for _ in range(3):
            assert await watch.poll(http) is None
    assert metadata.num_tokens == 1
    assert metadata.paths[0] == "PUT /latest/api/token"
    assert "GET /latest/meta-data/spot/instance-action" in metadata.paths
    assert "GET /latest/meta-data/events/recommendations/rebalance" in metadata.paths   # logged, no notice
    watch.probe._token = ("stale", time.monotonic() + 100)          # IMDS forgot it: 401, then a new one
    async with httpx.AsyncClient(timeout=0.5) as http:
        assert await watch.poll(http) is None
        assert await watch.poll(http) is None
    assert metadata.num_tokens == 2 and watch.probe._token[0] == AWS_TOKEN
    assert samples(watch.metrics)['ferry_worker_preemption_poll_errors_total{kind="status",source="aws-metadata"}'] == 1


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
@pytest.mark.parametrize("mode, kind", [("error", "status"), ("malformed", "malformed"), ("slow", "timeout")])
async def test_preempt_poll_errors_are_counted_and_polling_goes_on(metadata, cloud, mode, kind):
    watch = watch_of(cloud, metadata.url)
    if cloud == "aws":                     # the token first (the fake fails every GET, not the PUT)
        async with httpx.AsyncClient(timeout=0.5) as http:
            await watch.poll(http)
    metadata.mode = mode
    async with httpx.AsyncClient(timeout=0.3) as http:
        assert await watch.poll(http) is None
        assert await watch.poll(http) is None
        metadata.mode = "notice"
        assert await watch.poll(http) is not None          # it recovers on the next poll
    label = f'ferry_worker_preemption_poll_errors_total{{kind="{kind}",source="{watch.probe.source}"}}'
    assert samples(watch.metrics)[label] == 2


async def test_preempt_unreachable_metadata_is_counted():
    watch = watch_of("gcp", "http://127.0.0.1:1")
    async with httpx.AsyncClient(timeout=0.5) as http:
        assert await watch.poll(http) is None
    assert samples(watch.metrics)['ferry_worker_preemption_poll_errors_total{kind="unreachable",source="gcp-metadata"}'] == 1


async def test_preempt_watch_tells_the_scheduler_once_retrying_failures(metadata):
    recorder = RecordingScheduler(num_failures=2)
    server, address = await serve(recorder)
    try:
        watch = watch_of("azure", metadata.url, address, poll_s=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(watch.run(stop))
        await asyncio.sleep(0.2)
        assert recorder.num_calls == 0
        metadata.mode = "notice"
        for _ in range(100):
            if recorder.notices:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)                             # more polls see the same notice
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        await server.stop(None)
    assert [(n.instance_id, n.deadline_unix_s, n.source) for n in recorder.notices] == [
        ("decode-0", metadata.deadline_unix_s, "azure-metadata")]
    assert recorder.num_calls == 3
    assert samples(watch.metrics)['ferry_worker_preemption_notify_failures_total{source="azure-metadata"}'] == 2


@pytest.mark.parametrize("code, deadline_in_s, num_calls", [
    (grpc.StatusCode.FAILED_PRECONDITION, 30.0, 1),       # refused for good: no retry
    (grpc.StatusCode.UNAVAILABLE, 0.4, None),             # retried until the deadline, then given up
])
async def test_preempt_delivery_gives_up(code, deadline_in_s, num_calls):
    recorder = RecordingScheduler(num_failures=1000, code=code)
    server, address = await serve(recorder)
    try:
        watch = watch_of("gcp", "http://127.0.0.1:1", address, poll_s=0.1)
        watch.deadlines["gcp:preempted"] = time.time() + deadline_in_s
        async with grpc.aio.insecure_channel(address) as channel:
            started = time.monotonic()
            delivered = await asyncio.wait_for(
                watch.deliver(scheduler_pb2_grpc.SchedulerStub(channel), "gcp:preempted"), 5)
    finally:
        await server.stop(None)
    assert not delivered and recorder.notices == []
    if num_calls is not None:
        assert recorder.num_calls == num_calls
    else:
        assert recorder.num_calls >= 2 and time.monotonic() - started < deadline_in_s + 0.5


@pytest.mark.parametrize("kw, error", [
    ({"preemption_source": "ibm"}, "preemption_source"),
    ({"preemption_poll_s": 0}, "preemption_poll_s"),
    ({"preemption_grace_s": -1}, "preemption_grace_s"),
])
def test_preempt_settings_are_checked(kw, error):
    from services.worker.main import WorkerSettings
    with pytest.raises(ValueError, match=error):
        WorkerSettings(engine="sim", **kw)


@pytest.mark.parametrize("kw, is_watching", [
    ({}, False),                                                        # the default: none
    ({"preemption_source": "gcp"}, False),                              # nobody to tell
    ({"preemption_source": "gcp", "scheduler_address": "127.0.0.1:1"}, True),
])
def test_preempt_watch_runs_with_a_source_and_a_scheduler(kw, is_watching):
    from services.worker.http_endpoint import WorkerProbe
    from services.worker.main import WorkerSettings, preemption_watch
    probe = WorkerProbe(is_standalone=True)
    watch = preemption_watch(WorkerSettings(engine="sim", **kw), "decode-0", probe)
    assert (watch is not None) == is_watching == (probe.preemption is not None)
    if watch is not None:
        assert watch.probe.source == "gcp-metadata" and watch.probe.base_url.startswith("http://metadata.google.internal")
