"""Worker.SetPowerCap and WorkerStats.gpu on a real `--engine sim` worker (the simulated GPU), and the
sim engine's steps slowing with the clock (what makes a cap cost latency in the local runtime)."""
from __future__ import annotations

import urllib.request

import grpc
import pytest

from services.engine.sim_profile import SimProfile
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
from tests.procs import free_port, start, stop, wait_for_port


def gpu_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("ferry_worker_gpu_")}


@pytest.mark.integration
def test_sim_worker_takes_a_clock_cap_and_reports_it(tmp_path):
    port, metrics_port = free_port(), free_port()
    proc = start(["serve", "decode", "--engine", "sim", "--sim-num-blocks", "64", "--port", str(port),
                  "--metrics-port", str(metrics_port)], log=tmp_path / "worker.log")
    try:
        wait_for_port(port, proc, timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            gpu = stub.Stats(worker_pb2.StatsRequest(), timeout=5).gpu
            assert (gpu.backend, gpu.can_cap, gpu.clock_mhz, gpu.clock_cap_mhz) == ("simulated", True, 1980, 0)
            assert gpu_metrics(metrics_port)["ferry_worker_gpu_sm_clock_hertz"] == 1980e6
            reply = stub.SetPowerCap(worker_pb2.PowerCapRequest(clock_mhz=990, reason="test"), timeout=5)
            assert reply.gpu.clock_cap_mhz == 990 and reply.gpu.clock_mhz == 990 and "990" in reply.applied
            values = gpu_metrics(metrics_port)
            assert values["ferry_worker_gpu_sm_clock_cap_hertz"] == 990e6
            assert values["ferry_worker_gpu_power_limit_watts"] == 700
            reply = stub.SetPowerCap(worker_pb2.PowerCapRequest(watts=400), timeout=5)   # a limit alone
            assert reply.gpu.clock_cap_mhz == 0 and reply.gpu.power_limit_watts == 400
            assert reply.gpu.clock_mhz < 1980
            reply = stub.SetPowerCap(worker_pb2.PowerCapRequest(), timeout=5)            # uncap
            assert (reply.gpu.clock_mhz, reply.gpu.power_limit_watts) == (1980, 700)
            with pytest.raises(grpc.RpcError) as bad:
                stub.SetPowerCap(worker_pb2.PowerCapRequest(clock_mhz=-1), timeout=5)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stop(proc)


def test_sim_steps_slow_with_the_clock_compute_bound_far_more_than_memory_bound():
    profile = SimProfile.load("llama3-8b-h100")
    decode = profile.decode_cost(num_requests=8, num_context_tokens=8 * 1024)
    prefill_full = profile.seconds(4096, 4096 * 2048, 4096)
    prefill_half = profile.seconds(4096, 4096 * 2048, 4096, clock_ratio=0.5)
    assert decode.memory_s > decode.compute_s                       # small-batch decode: memory-bound
    assert decode.seconds_at(0.5) / decode.seconds_at(1.0) < 1.1
    assert (prefill_half - profile.step_overhead_s) / (prefill_full - profile.step_overhead_s) == pytest.approx(2.0)
    assert profile.seconds(8, 8 * 1024, 8 * 1024) == pytest.approx(decode.seconds_at(1.0))
