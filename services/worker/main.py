"""`ferry serve prefill|decode` (and the colocated `--role both`): one engine behind the Worker API.

    ferry serve decode --model models/SmolLM2-135M-Instruct --port 50062 \
        --scheduler-address 127.0.0.1:50050 --kvstore-address 127.0.0.1:50051

`--engine sim` runs the sim engine instead of the model (no weights are loaded): each step takes the
time that the `--sim-profile` performance model says, and emits placeholder token ids. Everything
else (registration, Prefill/Admit/PushKV, KV hand-off with real bytes, Stats) is the same worker.
`--model` then only names the served model and, when the folder has a config.json, caps the
placeholder ids to its vocabulary so that the gateway's tokenizer can decode them.

`--preemption-source aws|gcp|azure` (with a scheduler) polls the cloud's instance metadata for a
termination notice and tells the scheduler, which drains this worker (preemption_watch.py, docs/spot.md).
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from services.common.gpu_power import gpu_spec
from services.common.grpc_util import aio_server, bind
from services.common.lifecycle import run_service
from services.common.settings import parse_settings, setting
from services.gen.ferry.v1 import common_pb2, worker_pb2_grpc
from services.worker.power import PowerControl

log = logging.getLogger("ferry.worker")
ROLES = {"prefill": common_pb2.ROLE_PREFILL, "decode": common_pb2.ROLE_DECODE, "both": common_pb2.ROLE_BOTH}
ENGINES = ("llm", "sim")
POWER_BACKENDS = ("auto", "simulated", "nvml", "none")
PREEMPTION_SOURCES = ("none", "aws", "gcp", "azure")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    role: str = setting("both", "prefill, decode, or both (one colocated worker does both phases)")
    model: str = setting("models/SmolLM2-135M-Instruct", "HF-format model folder")
    served_model_name: str = setting("", "model name in the API and in KV layouts (default: folder name)")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(50060, "gRPC port (0: any free port)")
    metrics_port: int = setting(-1, "HTTP port of /metrics, /healthz and /readyz (-1: off, 0: any free port)")
    advertise_address: str = setting("", "host:port others reach this worker at (default: host:port)")
    instance_id: str = setting("", "unique name in the cluster (default: ROLE-HOST-PORT)")
    scheduler_address: str = setting("", "scheduler host:port to register with (empty: stand-alone)")
    kvstore_address: str = setting("", "kvstore host:port for shared prefix blocks (empty: none)")
    device: str = setting("cpu", "cpu or cuda[:N]")
    dtype: str = setting("float32", "float32, bfloat16 or float16")
    block_size: int = setting(16, "tokens per KV block (must match across workers)")
    kv_cache_memory_gb: float = setting(0.5, "KV cache budget on CPU")
    gpu_memory_utilization: float = setting(0.85, "share of the GPU's memory for weights + KV (CUDA); lower "
                                            "it to run several workers on one GPU")
    load_format: str = setting("safetensors", "safetensors, or dummy (random weights: benchmarks of a "
                               "model shape from its config.json alone)")
    max_num_seqs: int = setting(64, "requests in one batch")
    max_num_batched_tokens: int = setting(2048, "token budget of one step (prefill chunks + decodes)")
    max_model_len: int = setting(0, "context length cap (0: the model's)")
    enable_prefix_caching: bool = setting(True, "reuse KV of shared prompt prefixes")
    cpu_threads: int = setting(0, "torch CPU threads (0: torch's default, all cores)")
    engine: str = setting("llm", "llm (the model) or sim (a performance model paced in real time; no weights)")
    sim_profile: str = setting("llama3-8b-h100", "sim engine: profile name (services/engine/profiles) or YAML path")
    sim_num_blocks: int = setting(0, "sim engine: KV blocks (0: the engine's default, 4096)")
    gpu_idle_watts: float = setting(100.0, "sim engine: modelled GPU power when idle (H100 SXM)")
    gpu_peak_watts: float = setting(700.0, "sim engine: modelled GPU power when busy all the time (H100 SXM)")
    gpu_model: str = setting("h100-sxm", "simulated GPU: its clock range (h100-sxm or h200-sxm; "
                             "services/common/gpu_power.py)")
    power_backend: str = setting("auto", "GPU power backend: auto (sim engine: simulated, CUDA: nvml, CPU: "
                                 "none), simulated, nvml or none")
    power_control: str = setting("off", "what the scheduler's SetPowerCap may change on a real GPU: off (read "
                                 "only), clocks (lock the SM clock) or power-limit; both need root. The "
                                 "simulated GPU always takes caps")
    preemption_source: str = setting("none", "cloud whose instance metadata to poll for a spot/termination "
                                     "notice, told to the scheduler (it drains this worker): none, aws, gcp "
                                     "or azure (docs/spot.md)")
    preemption_metadata_url: str = setting("", "base URL of the metadata service (default: the cloud's, "
                                           "http://169.254.169.254 or http://metadata.google.internal)")
    preemption_poll_s: float = setting(5.0, "seconds between looks at the metadata service")
    preemption_grace_s: float = setting(30.0, "time left to assume when the cloud names no deadline (GCP)")
    shutdown_checkpoint_s: float = setting(10.0, "on SIGTERM, at most this long to write the running requests' "
                                           "KV to the kvstore before the gateway resumes them elsewhere "
                                           "(0: no checkpoint; they are recomputed)")
    preemption_vm_name: str = setting("", "azure: this VM's name in scheduled events (default: read from "
                                      "the instance metadata)")

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r}: use one of {', '.join(ROLES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.engine == "llm" and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model folder {self.model!r} has no config.json (run `make install`, or pass --model)")
        if self.sim_num_blocks < 0:
            raise ValueError(f"sim_num_blocks {self.sim_num_blocks}: use 0 (the default) or a positive count")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is outside 0..65535")
        if not 0 <= self.gpu_idle_watts <= self.gpu_peak_watts:
            raise ValueError(f"need 0 <= gpu_idle_watts ({self.gpu_idle_watts}) <= gpu_peak_watts "
                             f"({self.gpu_peak_watts}): set --gpu-idle-watts and --gpu-peak-watts")
        if self.power_backend not in POWER_BACKENDS:
            raise ValueError(f"power_backend {self.power_backend!r}: use one of {', '.join(POWER_BACKENDS)}")
        if self.power_control not in {c.value for c in PowerControl}:
            raise ValueError(f"power_control {self.power_control!r}: use one of "
                             f"{', '.join(c.value for c in PowerControl)}")
        gpu_spec(self.gpu_model)
        if self.preemption_source not in PREEMPTION_SOURCES:
            raise ValueError(f"preemption_source {self.preemption_source!r}: use one of "
                             f"{', '.join(PREEMPTION_SOURCES)}")
        if self.preemption_poll_s <= 0 or self.preemption_grace_s <= 0:
            raise ValueError(f"preemption_poll_s ({self.preemption_poll_s}) and preemption_grace_s "
                             f"({self.preemption_grace_s}) must be > 0")
        if self.shutdown_checkpoint_s < 0:
            raise ValueError(f"shutdown_checkpoint_s {self.shutdown_checkpoint_s}: use 0 (no checkpoint) or more")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port {self.metrics_port}: use -1 (off), 0 (any free port) or a port")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def engine_config(s: WorkerSettings):
    from services.engine.config import EngineConfig
    return EngineConfig(model=s.model, device=s.device, dtype=s.dtype, block_size=s.block_size,
                        kv_cache_memory_gb=s.kv_cache_memory_gb, max_num_seqs=s.max_num_seqs,
                        max_num_batched_tokens=s.max_num_batched_tokens, max_model_len=s.max_model_len or None,
                        enable_prefix_caching=s.enable_prefix_caching, model_id=s.model_name,
                        gpu_memory_utilization=s.gpu_memory_utilization, load_format=s.load_format)


def power_backend(s: WorkerSettings, servicer):
    """The worker's GPU power backend, or None (a CPU worker)."""
    from services.worker.power import simulated_gpu
    kind = s.power_backend
    if kind == "auto":
        kind = "simulated" if s.engine == "sim" else "nvml" if s.device.startswith("cuda") else "none"
    if kind == "none":
        return None
    if kind == "nvml":
        from services.worker.nvml_gpu import NvmlGpu
        try:
            return NvmlGpu(s.device, PowerControl(s.power_control))
        except Exception as e:    # pynvml's NVMLError, a missing driver: serve without readings
            if s.power_backend == "nvml":
                raise RuntimeError(f"--power-backend nvml: {e}") from e
            log.warning("no GPU power readings (NVML: %s); pass --power-backend none to silence this", e)
            return None

    def on_clock(ratio: float) -> None:      # a sim engine's steps slow with the clock (a float write)
        if hasattr(servicer.engine, "clock_ratio"):
            servicer.engine.clock_ratio = ratio
    return simulated_gpu(servicer.loop.busy, gpu_spec(s.gpu_model), s.gpu_idle_watts, s.gpu_peak_watts, on_clock)


def preemption_watch(s: WorkerSettings, instance_id: str, probe):
    """The watcher of the cloud's metadata for a termination notice (preemption_watch.py), where a source
    and a scheduler are set, else None. Its metrics go on the probe's /metrics."""
    if s.preemption_source == "none":
        return None
    if not s.scheduler_address:
        log.warning("--preemption-source %s needs --scheduler-address (the scheduler drains this worker): "
                    "not watching", s.preemption_source)
        return None
    from services.worker.metadata_probes import ERROR_KINDS, make_probe
    from services.worker.metrics import PreemptionMetrics
    from services.worker.preemption_watch import PreemptionWatch, WatchConfig
    cloud = make_probe(s.preemption_source, s.preemption_metadata_url, s.preemption_vm_name)
    probe.preemption = PreemptionMetrics(cloud.source, ERROR_KINDS)
    config = WatchConfig(instance_id=instance_id, scheduler_address=s.scheduler_address,
                         poll_s=s.preemption_poll_s, grace_s=s.preemption_grace_s)
    return PreemptionWatch(cloud, config, probe.preemption)


def build_engine(s: WorkerSettings):
    """The worker's engine: the model (`llm`), or the sim engine paced in real time (`sim`)."""
    if s.engine == "llm":
        from services.engine.engine import LLMEngine
        return LLMEngine(engine_config(s))
    from services.engine.sim_engine import SimEngine, SimProfile
    profile = SimProfile.load(s.sim_profile)
    config_file = Path(s.model) / "config.json"
    if config_file.is_file():
        # Placeholder ids must be tokens of the served model: the gateway detokenizes them with its
        # tokenizer (and prompts tokenized by it must pass the engine's vocabulary check).
        vocab_size = json.loads(config_file.read_text()).get("vocab_size", profile.vocab_size)
        if vocab_size < profile.vocab_size:
            log.info("sim profile %s: vocab_size %d capped to %s's %d", profile.name, profile.vocab_size,
                     s.model, vocab_size)
            profile = dataclasses.replace(profile, vocab_size=vocab_size)
    return SimEngine(engine_config(s), profile, num_blocks=s.sim_num_blocks or None, realtime=True)


async def serve(s: WorkerSettings, stop: asyncio.Event) -> None:
    from services.kvstore.client import KVStoreClient
    from services.worker.http_endpoint import WorkerProbe, serve_http
    from services.worker.registration import keep_registered
    from services.worker.servicer import WorkerServicer

    if s.cpu_threads > 0:
        import torch
        torch.set_num_threads(s.cpu_threads)
    # Up before the engine loads (minutes for a big model): /healthz answers, /readyz says "loading".
    probe = WorkerProbe(is_standalone=not s.scheduler_address)
    http = serve_http(probe, s.host, s.metrics_port) if s.metrics_port >= 0 else None
    if http is not None:
        log.info("metrics and probes on http://%s:%d/", s.host, http.server_port)
    engine = await asyncio.to_thread(build_engine, s)
    # Everything alive now (model, tokenizer, torch's modules) lives as long as the process: move it out
    # of the collector's sight, or each full collection walks it all and stalls a step by ~250 ms.
    gc.collect()
    gc.freeze()
    kvstore = KVStoreClient(s.kvstore_address) if s.kvstore_address else None
    server = aio_server()
    port = bind(server, s.host, s.port)
    address = s.advertise_address or f"{s.host}:{port}"
    instance_id = s.instance_id or f"{s.role}-{s.host}-{port}"
    servicer = WorkerServicer(engine, instance_id=instance_id, role=ROLES[s.role], kvstore=kvstore,
                              address=address)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    servicer.gpu = probe.power = power_backend(s, servicer)
    if servicer.gpu is not None:
        log.info("GPU power: %s backend, power control %s", servicer.gpu.name, servicer.gpu.control.value)
    servicer.loop.start()
    await server.start()
    probe.servicer = servicer
    # The longest request this worker can hold: the model's context, or less when the KV pool is smaller
    # (a longer one is refused at Admit/add_request, so the gateway must not offer it, e.g. as the
    # default max_tokens of a chat request).
    max_model_len = min(engine.max_model_len, engine.kv.pool.num_blocks * engine.layout.block_size)
    log.info("%s worker %s serving %s on %s (%s engine, %d KV blocks, requests up to %d tokens)", s.role,
             instance_id, s.model_name, address, s.engine if s.engine == "llm" else f"sim:{s.sim_profile}",
             engine.kv.pool.num_blocks, max_model_len)
    registration = None
    if s.scheduler_address:
        instance = common_pb2.Instance(instance_id=instance_id, role=ROLES[s.role], address=address,
                                       model=s.model_name, block_size=s.block_size,
                                       max_model_len=max_model_len)
        registration = asyncio.create_task(keep_registered(s.scheduler_address, instance,
                                                           probe.heartbeat_load(servicer.load), stop))
    watch = preemption_watch(s, instance_id, probe)
    watching = asyncio.create_task(watch.run(stop)) if watch is not None else None
    await stop.wait()
    probe.is_stopping = True
    for task in (registration, watching):
        if task is not None:
            await task
    # Requests still here (the scheduler could not migrate them) resume elsewhere now, not after the
    # gateway's timeout: their KV goes to the kvstore first, so the resume is a prefix hit.
    released = await servicer.release_all(s.shutdown_checkpoint_s)
    await servicer.pusher.finish(timeout=5)
    if released:
        log.info("released %d requests to resume elsewhere", released)
    await server.stop(grace=2)
    await servicer.close()
    if kvstore is not None:
        await kvstore.close()
    if http is not None:
        http.shutdown()


def main(argv: list[str] | None = None, role: str | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prog = f"ferry serve {role or 'worker'}"
    argv = sys.argv[1:] if argv is None else list(argv)
    if role is not None and "FERRY_WORKER_ROLE" not in os.environ:
        argv = ["--role", role, *argv]    # the entry point's role is the default: `--role both` still wins
    settings = parse_settings(WorkerSettings, argv, prog=prog, description=__doc__.split("\n")[0],
                              env_prefix="FERRY_WORKER_")
    return run_service(settings.role, lambda stop: serve(settings, stop))
