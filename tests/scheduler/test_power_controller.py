"""The scheduler's power loop (services/scheduler/power_controller.py) against real `--engine sim` workers:
it reads their GPU power over Stats, decides, and caps them through SetPowerCap; the caps show in the
workers' Stats and in the scheduler's metrics; a worker that restarts gets its cap back."""
from __future__ import annotations

import time

import grpc
import pytest

from services.common.cluster import InstanceSpec, InstanceState, RequestLoad, RequestPhase, Role, WorkerLoad
from services.engine.sim_profile import SimProfile
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.policies.power import PowerConfig, PowerLevel
from services.scheduler.power_controller import PowerController, instance_decode_step
from services.scheduler.registry import Registry
from tests.procs import free_port, start, stop, wait_for_port

pytestmark = pytest.mark.integration
IDLE_W = 50.0


def start_worker(tmp_path, name: str, port: int):
    return start(["serve", "decode", "--engine", "sim", "--sim-num-blocks", "64", "--port", str(port),
                  "--gpu-idle-watts", str(IDLE_W)], log=tmp_path / f"{name}.log")


def clock_cap(port: int) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=5).gpu.clock_cap_mhz


async def test_idle_workers_over_threshold2_are_capped_and_a_restarted_one_again(tmp_path):
    ports = [free_port(), free_port()]
    procs = [start_worker(tmp_path, f"w{i}", port) for i, port in enumerate(ports)]
    registry, metrics = Registry(heartbeat_timeout_s=3600), SchedulerMetrics()
    # Two idle GPUs draw 2 x 50 W: over threshold 2 (0.95 x 104 W), under the budget.
    config = PowerConfig(budget_watts=104.0, tpot_slo_s=0.1)
    controller = PowerController(registry, config, SimProfile.load("llama3-8b-h100"), metrics, interval_s=1.0)
    try:
        for i, port in enumerate(ports):
            wait_for_port(port, procs[i], timeout=60)
            registry.register(InstanceSpec(f"d{i}", Role.DECODE, f"127.0.0.1:{port}", "m", 16, 4096), time.time())
        decision = await controller.step()
        assert decision.level is PowerLevel.THRESHOLD2 and decision.total_watts == pytest.approx(2 * IDLE_W)
        expected = {c.instance_id: c.clock_mhz for c in decision.caps}
        assert set(expected) == {"d0", "d1"}
        assert [clock_cap(p) for p in ports] == [expected["d0"], expected["d1"]]
        value = metrics.registry.get_sample_value
        assert value("ferry_scheduler_power_caps", {"pool": "decode", "reason": "threshold2"}) == 2
        assert value("ferry_scheduler_power_cap_changes_total", {"pool": "decode", "reason": "threshold2"}) == 2
        assert value("ferry_scheduler_power_level") == 2
        # A restart loses the cap on the worker; the next round puts it back.
        stop(procs[0])
        procs[0] = start_worker(tmp_path, "w0-again", ports[0])
        wait_for_port(ports[0], procs[0], timeout=60)
        assert clock_cap(ports[0]) == 0
        await controller.step()
        assert clock_cap(ports[0]) == expected["d0"]
    finally:
        for proc in procs:
            stop(proc)


def test_decode_step_follows_the_batch_and_prefill_has_none():
    profile = SimProfile.load("llama3-8b-h100")
    spec = InstanceSpec("p", Role.PREFILL, "x:1", "m", 16, 4096)
    assert instance_decode_step(profile, InstanceState(spec)) is None
    load = WorkerLoad(requests=(RequestLoad("a", RequestPhase.DECODING, num_tokens=3000),
                                RequestLoad("b", RequestPhase.WAITING, num_tokens=100)))
    decode = InstanceState(InstanceSpec("d", Role.DECODE, "x:2", "m", 16, 4096), load)
    assert instance_decode_step(profile, decode) == profile.decode_cost(1, 3000)
