"""`NvmlGpu` (services/worker/nvml_gpu.py): against a stand-in NVML module (what it reads, which calls a cap
makes, that `--power-control off` never reaches NVML), and, marked `gpu`, against the real GPU while a
CUDA worker generates: NVML read ONLY (this test never sets a limit, a clock or a mode).

On the GPU machine it prints one line per sample (power, energy, limit, SM clock, and the worker's
/metrics), so the numbers can be recorded: `pytest tests/worker/test_nvml_gpu.py -m gpu -s`.
"""
from __future__ import annotations

import os
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from services.gen.ferry.v1 import common_pb2, token_sink_pb2, token_sink_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.worker.nvml_gpu import NvmlGpu, nvml_index
from services.worker.power import PowerControl
from tests.procs import ROOT, free_port, start, stop, wait_for_port


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml:
    """The pynvml calls NvmlGpu makes, on one fake H200; records every setter."""
    NVML_CLOCK_SM = 1
    NVML_ERROR_NO_PERMISSION = 4
    NVMLError = FakeNvmlError

    def __init__(self, deny: bool = False) -> None:
        self.deny = deny
        self.energy_mj = 5_000_000
        self.limit_mw = 700_000
        self.calls: list[tuple] = []

    def nvmlInit(self): self.calls.append(("init",))
    def nvmlShutdown(self): self.calls.append(("shutdown",))
    def nvmlDeviceGetHandleByIndex(self, i): return ("gpu", i)
    def nvmlDeviceGetHandleByUUID(self, u): return ("gpu", u)
    def nvmlDeviceGetMaxClockInfo(self, h, clock): return 1980
    def nvmlDeviceGetClockInfo(self, h, clock): return 1755
    def nvmlDeviceGetPowerUsage(self, h): return 412_345
    def nvmlDeviceGetTotalEnergyConsumption(self, h): return self.energy_mj
    def nvmlDeviceGetEnforcedPowerLimit(self, h): return self.limit_mw
    def nvmlDeviceGetPowerManagementLimitConstraints(self, h): return (200_000, 700_000)
    def nvmlDeviceGetPowerManagementDefaultLimit(self, h): return 700_000

    def _set(self, *call):
        if self.deny:
            raise FakeNvmlError(self.NVML_ERROR_NO_PERMISSION)
        self.calls.append(call)

    def nvmlDeviceSetGpuLockedClocks(self, h, low, high): self._set("lock", low, high)
    def nvmlDeviceResetGpuLockedClocks(self, h): self._set("unlock")
    def nvmlDeviceSetPowerManagementLimit(self, h, mw): self._set("limit", mw)

    @property
    def setters(self) -> list[tuple]:
        return [c for c in self.calls if c[0] in ("lock", "unlock", "limit")]


def test_reads_power_energy_since_start_limit_and_clock():
    nvml = FakeNvml()
    gpu = NvmlGpu("cuda", nvml=nvml)
    nvml.energy_mj += 2_500_000
    r = gpu.read()
    assert (r.power_watts, r.energy_joules, r.power_limit_watts) == (412.345, 2500.0, 700.0)
    assert (r.clock_mhz, r.max_clock_mhz, r.clock_cap_mhz) == (1755.0, 1980.0, None)
    assert gpu.limits() == (200.0, 700.0)


def test_read_only_by_default_never_calls_a_setter():
    nvml = FakeNvml()
    gpu = NvmlGpu("cuda", nvml=nvml)
    assert gpu.control is PowerControl.OFF
    with pytest.raises(PermissionError, match="--power-control"):
        gpu.apply(990, None)
    with pytest.raises(PermissionError):
        gpu.apply(None, 300)
    gpu.close()
    assert nvml.setters == []


def test_clock_control_locks_and_close_unlocks():
    nvml = FakeNvml()
    gpu = NvmlGpu("cuda", PowerControl.CLOCKS, nvml=nvml)
    gpu.apply(990.7, 123)                         # the watts are not this mode's lever
    assert gpu.read().clock_cap_mhz == 990
    gpu.apply(5000, None)                         # never above the maximum
    gpu.close()
    assert nvml.setters == [("lock", 0, 990), ("lock", 0, 1980), ("unlock",)]


def test_power_limit_control_clamps_to_the_constraints_and_close_restores_the_default():
    nvml = FakeNvml()
    gpu = NvmlGpu("cuda", PowerControl.POWER_LIMIT, nvml=nvml)
    gpu.apply(None, 150)
    gpu.apply(990, 450)
    gpu.close()
    assert nvml.setters == [("limit", 200_000), ("limit", 450_000), ("limit", 700_000)]


def test_nvml_refusal_is_a_permission_error():
    gpu = NvmlGpu("cuda", PowerControl.CLOCKS, nvml=FakeNvml(deny=True))
    with pytest.raises(PermissionError, match="root"):
        gpu.apply(990, None)


@pytest.mark.parametrize(("device", "visible", "index"), [
    ("cuda", "", 0), ("cuda:1", "", 1), ("cuda:1", "3,5", 5), ("cuda", "GPU-abc, GPU-def", "GPU-abc")])
def test_torch_device_to_nvml_index(device, visible, index):
    assert nvml_index(device, visible) == index


def test_missing_visible_device_is_explained():
    with pytest.raises(ValueError, match="lists only 1"):
        nvml_index("cuda:1", "0")


# ---- the real GPU, read only ----------------------------------------------------------------------------

class CountingSink(token_sink_pb2_grpc.TokenSinkServicer):
    def __init__(self) -> None:
        self.num_tokens = 0
        self.finished = 0

    def Push(self, request_iterator, context):
        for batch in request_iterator:
            for event in batch.events:
                self.num_tokens += len(event.token_ids)
                self.finished += bool(event.finish_reason)
        return token_sink_pb2.PushReply()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("ferry_worker_gpu_")}


@pytest.mark.gpu
def test_nvml_readings_while_a_cuda_worker_generates(tmp_path):
    model = Path(os.environ.get("FERRY_GPU_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))
    dummy = [] if (model / "model.safetensors").is_file() else ["--load-format", "dummy"]
    sink, sink_port = grpc.server(futures.ThreadPoolExecutor(4)), free_port()
    counting = CountingSink()
    token_sink_pb2_grpc.add_TokenSinkServicer_to_server(counting, sink)
    sink.add_insecure_port(f"127.0.0.1:{sink_port}")
    sink.start()
    port, metrics_port = free_port(), free_port()
    proc = start(["serve", "decode", "--role", "both", "--model", str(model), *dummy, "--device", "cuda", "--dtype", "bfloat16",
                  "--gpu-memory-utilization", "0.2", "--max-num-seqs", "128", "--port", str(port),
                  "--metrics-port", str(metrics_port)], log=tmp_path / "worker.log")
    gpu = NvmlGpu("cuda")                                   # read only: PowerControl.OFF
    try:
        wait_for_port(port, proc, timeout=300)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            stats = stub.Stats(worker_pb2.StatsRequest(), timeout=10)
            assert stats.gpu.backend == "nvml" and not stats.gpu.can_cap
            with pytest.raises(grpc.RpcError) as refused:    # the worker refuses: it never reaches NVML
                stub.SetPowerCap(worker_pb2.PowerCapRequest(clock_mhz=990), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            samples = [("idle", gpu.read(), scrape(metrics_port))]
            sampling = common_pb2.SamplingOptions(max_tokens=1500, ignore_eos=True, temperature=0.0)

            def prefill(i: int) -> None:
                stub.Prefill(worker_pb2.PrefillRequest(request_id=f"r{i}", prompt_token_ids=[1 + i % 500] * 200,
                                                       sampling=sampling, sink_address=f"127.0.0.1:{sink_port}"),
                             timeout=60)
            threads = [threading.Thread(target=prefill, args=(i,)) for i in range(96)]
            for t in threads:
                t.start()
            started = time.monotonic()
            while time.monotonic() - started < 8:
                time.sleep(1.0)
                samples.append((f"{time.monotonic() - started:4.1f}s", gpu.read(), scrape(metrics_port)))
            for t in threads:
                t.join()
        low, high = gpu.limits()
        print(f"\nNVML power-limit constraints {low:.0f}..{high:.0f} W; max SM clock {gpu.max_clock_mhz:.0f} MHz; "
              f"tokens streamed {counting.num_tokens}")
        for when, r, m in samples:
            print(f"{when:>6}  nvml: {r.power_watts:6.1f} W  {r.energy_joules:8.1f} J  limit {r.power_limit_watts:.0f} W"
                  f"  SM {r.clock_mhz:.0f} MHz  |  /metrics: {m.get('ferry_worker_gpu_power_watts', -1):6.1f} W  "
                  f"{m.get('ferry_worker_gpu_energy_joules_total', -1):8.1f} J  "
                  f"SM {m.get('ferry_worker_gpu_sm_clock_hertz', -1) / 1e6:.0f} MHz")
        busy = samples[1:]
        assert counting.num_tokens > 0
        assert all(r.power_watts > 0 and low <= r.power_limit_watts <= high for _, r, _ in samples)
        assert max(r.power_watts for _, r, _ in busy) > samples[0][1].power_watts       # work draws more
        assert busy[-1][2]["ferry_worker_gpu_energy_joules_total"] > samples[0][2]["ferry_worker_gpu_energy_joules_total"]
        assert all(m["ferry_worker_gpu_sm_clock_cap_hertz"] == 0 for _, _, m in samples)
    finally:
        gpu.close()
        stop(proc)
        sink.stop(0)
        print((tmp_path / "worker.log").read_text()[-2000:])
