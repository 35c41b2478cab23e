"""A real scheduler learns of a spot termination from a real `--engine sim` worker that polls a fake
AWS metadata service on loopback (`--preemption-source aws`): the notice is counted by source and the
scheduler's drain turns the worker draining."""
from __future__ import annotations

import urllib.request

import grpc
import pytest

from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.procs import eventually, free_port, start, stop, wait_for_port
from tests.worker.fake_metadata import FakeMetadata

pytestmark = pytest.mark.integration


def scrape(port: int, prefix: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(prefix)}


def test_preempt_notice_from_aws_metadata_reaches_the_scheduler_and_drains_the_worker(tmp_path):
    metadata = FakeMetadata()
    scheduler_port, scheduler_metrics = free_port(), free_port()
    worker_port, worker_metrics = free_port(), free_port()
    procs = [start(["serve", "scheduler", "--port", str(scheduler_port), "--metrics-port", str(scheduler_metrics),
                    "--heartbeat-interval-s", "0.2"], log=tmp_path / "scheduler.log")]
    try:
        wait_for_port(scheduler_port, procs[0], timeout=60)
        procs.append(start(["serve", "decode", "--engine", "sim", "--sim-num-blocks", "64",
                            "--port", str(worker_port), "--metrics-port", str(worker_metrics),
                            "--instance-id", "decode-spot", "--scheduler-address", f"127.0.0.1:{scheduler_port}",
                            "--preemption-source", "aws", "--preemption-metadata-url", metadata.url,
                            "--preemption-poll-s", "0.2"], log=tmp_path / "worker.log"))
        with grpc.insecure_channel(f"127.0.0.1:{scheduler_port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)

            def instance() -> scheduler_pb2.InstanceStatus | None:
                reply = stub.ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=5)
                return next((s for s in reply.instances if s.instance.instance_id == "decode-spot"), None)

            assert eventually(lambda: instance() is not None and instance().healthy, timeout=60)
            assert eventually(lambda: "GET /latest/meta-data/spot/instance-action" in metadata.paths, timeout=10)
            watched = scrape(worker_metrics, "ferry_worker_preemption_")
            assert watched['ferry_worker_preemption_notices_total{source="aws-metadata"}'] == 0
            assert watched["ferry_worker_preemption_deadline_timestamp_seconds"] == 0
            assert not instance().load.draining

            metadata.mode = "notice"
            notices = 'ferry_scheduler_preemption_notices_total{source="aws-metadata"}'
            assert eventually(lambda: scrape(scheduler_metrics, notices).get(notices) == 1, timeout=15)
            assert eventually(lambda: instance().load.draining, timeout=15)
            watched = scrape(worker_metrics, "ferry_worker_preemption_")
            assert watched['ferry_worker_preemption_notices_total{source="aws-metadata"}'] == 1
            assert watched["ferry_worker_preemption_deadline_timestamp_seconds"] == metadata.deadline_unix_s
            assert scrape(worker_metrics, "ferry_worker_draining")["ferry_worker_draining"] == 1
            num_polls = metadata.paths.count("GET /latest/meta-data/spot/instance-action")
            assert eventually(lambda: metadata.paths.count("GET /latest/meta-data/spot/instance-action")
                              >= num_polls + 3, timeout=10)
            assert scrape(scheduler_metrics, notices)[notices] == 1          # told once, polled on
    finally:
        for proc in reversed(procs):
            stop(proc)
        metadata.close()
