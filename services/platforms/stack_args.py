"""The command lines of a Ferry stack's services, shared by every platform that starts them (`ferry up`
locally and on Ray): what a platform adds is only where each process runs and at which address.

All functions are pure: `args` is `ferry up`'s parsed command line (services/platforms/local.py).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

SCHEDULER_OWNED = ("host", "port", "redis-url")   # scheduler settings that ferry up chooses itself


def scheduler_flags(items: list[str]) -> list[str]:
    """`--scheduler-arg` items -> the scheduler's flags (`routing-config=x` -> `--routing-config x`).
    ValueError names the item when it is not KEY=VALUE, not a scheduler setting, or one ferry up sets."""
    from services.scheduler.main import SchedulerSettings  # only the dataclass: no server starts

    known = {f.name.replace("_", "-") for f in dataclasses.fields(SchedulerSettings)}
    flags = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--").replace("_", "-")
        if not sep or not key:
            raise ValueError(f"--scheduler-arg {item!r}: use KEY=VALUE, e.g. routing-config=round_robin")
        if key in SCHEDULER_OWNED:
            raise ValueError(f"--scheduler-arg {item!r}: ferry up sets --{key} itself")
        if key not in known:
            raise ValueError(f"--scheduler-arg {item!r}: the scheduler has no setting {key!r}; known: "
                             f"{', '.join(sorted(known - set(SCHEDULER_OWNED)))}")
        flags += [f"--{key}", value]
    return flags


def autoscale_profile(args: argparse.Namespace) -> str:
    """The performance profile the scheduler's goodput model sizes pools with: the sim engine's own, the
    shipped CPU profile of the small model, or (a GPU) one measured by `ferry profile` and passed as
    `--scheduler-arg autoscale-profile=PATH` (which wins over this one)."""
    if args.engine == "sim":
        return args.sim_profile
    if args.device == "cpu":
        return "smollm2-135m-cpu"
    if not any(a.startswith("autoscale-profile=") for a in args.scheduler_arg):
        raise ValueError(f"--autoscale on --device {args.device} needs the engine's profile for that device: "
                         f"`ferry profile --model {args.model} --device {args.device} --out P.yaml`, then "
                         "--scheduler-arg autoscale-profile=P.yaml")
    return ""


def served_model_name(args: argparse.Namespace) -> str:
    """The name the pools serve under (the API's `model`)."""
    return args.served_model_name or Path(args.model).name


def scheduler_argv(args: argparse.Namespace, host: str, port: int, redis_url: str, gateway_metrics_url: str) -> list[str]:
    """`ferry serve scheduler` flags: SLOs, autoscaling bounds, then the user's --scheduler-arg (they win)."""
    argv = ["--host", host, "--port", str(port), *(["--redis-url", redis_url] if redis_url else []),
            "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms)]
    if args.autoscale:
        profile = autoscale_profile(args)       # "": the user's --scheduler-arg autoscale-profile=
        argv += ["--autoscale-interval-s", str(args.autoscale_interval),
                 "--gateway-metrics-urls", gateway_metrics_url,
                 *(["--autoscale-profile", profile] if profile else []),
                 "--autoscale-model", served_model_name(args),
                 "--autoscale-prefill-replicas", f"1:{args.max_prefill}",
                 "--autoscale-decode-replicas", f"1:{args.max_decode}"]
    return argv + scheduler_flags(args.scheduler_arg)


def worker_argv(args: argparse.Namespace, host: str, scheduler_address: str, kvstore_address: str,
                num_workers: int, cpu_count: int, engine: str | None = None) -> list[str]:
    """Flags every worker of the pools shares (`engine`: override --engine, e.g. the llm pair beside sim
    pools, which serves --model under its folder name). CPU workers share the cores out among
    `num_workers` instead of oversubscribing them."""
    engine = engine or args.engine
    argv = ["--model", args.model, "--host", host, "--scheduler-address", scheduler_address,
            "--device", args.device, "--dtype", args.dtype,
            "--kv-cache-memory-gb", str(args.kv_cache_memory_gb), "--max-num-seqs", str(args.max_num_seqs)]
    if kvstore_address:
        argv += ["--kvstore-address", kvstore_address]
    if engine == "sim":
        argv += ["--engine", "sim", "--sim-profile", args.sim_profile, "--sim-num-blocks", str(args.sim_num_blocks),
                 "--cpu-threads", str(args.cpu_threads or 1)]
        if args.served_model_name:
            argv += ["--served-model-name", args.served_model_name]
    else:
        if args.served_model_name and engine == args.engine:
            argv += ["--served-model-name", args.served_model_name]
        if args.device == "cpu":
            argv += ["--cpu-threads", str(args.cpu_threads or max(1, cpu_count // max(1, num_workers)))]
    return argv


def gateway_argv(args: argparse.Namespace, host: str, sink_port: int, scheduler_address: str) -> list[str]:
    return ["--model", args.model, "--host", host, "--port", str(args.port), "--sink-port", str(sink_port),
            "--scheduler-address", scheduler_address,
            "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms)]
