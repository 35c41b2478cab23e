"""SchedulerClient against a real scheduler process and a real (sim-engine) decode worker: loads,
drain and its cancel, preemption notices, NOT_FOUND, and every way the scheduler can be unavailable."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from operators.ferry_operator.pool_plan import InstanceLoad
from operators.ferry_operator.scheduler_client import SchedulerClient, SchedulerUnavailable
from tests.procs import free_port, start, stop, wait_for_port

WORKER = "decode-under-test"


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """address of a scheduler (live migration on) that one sim decode worker has registered with."""
    logs = tmp_path_factory.mktemp("scheduler-client")
    port, worker_port = free_port(), free_port()
    sched = start(["serve", "scheduler", "--port", str(port), "--autoscale-interval-s", "0.2",
                   "--autoscale-decode-replicas", "2:4"], log=logs / "scheduler.log")
    worker = None
    try:
        wait_for_port(port, sched)
        worker = start(["serve", "decode", "--engine", "sim", "--port", str(worker_port), "--instance-id", WORKER,
                        "--scheduler-address", f"127.0.0.1:{port}"], log=logs / "worker.log")
        wait_for_port(worker_port, worker)
        yield f"127.0.0.1:{port}"
    finally:
        for proc in (worker, sched):
            if proc is not None:
                stop(proc)


@pytest.fixture
async def client(scheduler):
    c = SchedulerClient(scheduler, timeout_s=2)
    yield c
    await c.close()


async def registered(client: SchedulerClient) -> dict[str, InstanceLoad]:
    for _ in range(100):
        loads = await client.list_instances()
        if WORKER in loads:
            return loads
        await asyncio.sleep(0.1)
    raise AssertionError("the worker never registered")


async def test_list_instances_then_drain_and_cancel(client):
    assert (await registered(client))[WORKER] == InstanceLoad(0, False)
    assert await client.drain(WORKER) == 0
    assert (await client.list_instances())[WORKER].is_draining
    assert await client.drain(WORKER, cancel=True) == 0
    assert not (await client.list_instances())[WORKER].is_draining


async def test_recommendations_are_the_autoscalers_desired_replicas(client):
    await registered(client)
    # No gateway to read: no demand data, so each pool is held at its size within the bounds (decode 1 -> 2).
    for _ in range(50):
        if await client.recommendations() == {"prefill": 1, "decode": 2}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"recommendations: {await client.recommendations()}")


async def test_unknown_instance_is_none_not_an_error(client):
    await registered(client)
    assert await client.drain("no-such-pod") is None
    assert await client.notify_preemption("no-such-pod", 0.0, "admin") is None


async def test_preemption_notice_drains(client):
    await registered(client)
    assert await client.notify_preemption(WORKER, 123.0, "node-taint:karpenter.sh/disrupted") == 0
    assert (await client.list_instances())[WORKER].is_draining
    await client.drain(WORKER, cancel=True)


async def test_migration_off_is_failed_precondition(tmp_path):
    port = free_port()
    sched = start(["serve", "scheduler", "--port", str(port), "--migration-interval-s", "0"],
                  log=tmp_path / "scheduler.log")
    try:
        wait_for_port(port, sched)
        c = SchedulerClient(f"127.0.0.1:{port}", timeout_s=2)
        with pytest.raises(SchedulerUnavailable, match="FAILED_PRECONDITION"):
            await c.drain("anything")
        await c.close()
    finally:
        stop(sched)


async def test_silent_peer_and_nobody_raise_scheduler_unavailable():
    silent = socket.create_server(("127.0.0.1", 0))      # accepts, never answers: a hung scheduler
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    c = SchedulerClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
    with pytest.raises(SchedulerUnavailable, match="DEADLINE_EXCEEDED|UNAVAILABLE"):
        await c.list_instances()
    await c.close()
    silent.close()
    nobody = SchedulerClient(f"127.0.0.1:{free_port()}", timeout_s=0.5)
    with pytest.raises(SchedulerUnavailable, match="ListInstances at 127.0.0.1"):
        await nobody.list_instances()
    await nobody.close()
