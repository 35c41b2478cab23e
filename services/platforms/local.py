"""`ferry up`: the whole stack as local processes on 127.0.0.1 (the embedded default; `make run`).

    redis (if installed) ─ scheduler ─ kvstore ─ prefill ×N ─ decode ×M ─ gateway :8000
                                                 (or: worker ×K with --colocated)

`--engine sim` gives every worker the sim engine (a performance model paced in real time, no weights):
the stack starts in seconds and many cheap workers fit on one machine. The gateway still tokenizes with
--model's tokenizer, and the workers serve under that folder's name.

Children run in their own process group and die with this process (PR_SET_PDEATHSIG), so Ctrl-C,
SIGTERM or a crash of `ferry up` leaves nothing behind. Logs go to --log-dir (one file per process).

`--scheduler-arg KEY=VALUE` (repeatable) passes any `ferry serve scheduler` setting through, e.g. the
routing preset and live migration of the Llumnix-style comparison (bench/llumnix.py):

    ferry up --engine sim --decode 4 --scheduler-arg routing-config=round_robin \
        --scheduler-arg migration-interval-s=0 --scheduler-arg metrics-port=9100
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.platforms import stack_auth
from services.platforms.local_scaler import LocalScaler
from services.platforms.stack_args import (
    SCHEDULER_OWNED,
    autoscale_profile,
    gateway_argv,
    scheduler_argv,
    scheduler_flags,
    served_model_name,
    worker_argv,
)

ROOT = Path(__file__).resolve().parents[2]
# glibc malloc settings for the children: large KV buffers reuse memory instead of being mmapped and
# page-faulted afresh for every message. Measured by bench/kv_transfer.py: gRPC KV streaming 2.5x
# faster with these (0.25 -> 0.64 GB/s before the stream code itself was tuned). An env var set by
# the user wins.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824",
              "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry up", description="Start a whole Ferry cluster: on this machine "
                                "(--platform local, the default) or on a Ray cluster (--platform ray).")
    p.add_argument("--platform", choices=("local", "ray"), default="local",
                   help="local: processes on this machine; ray: Ray Serve deployments (docs/platforms.md)")
    p.add_argument("--address", default="", metavar="ADDR",
                   help="--platform ray: the Ray cluster (auto, HOST:PORT or ray://HOST:10001); empty: start a "
                        "local Ray instance, closed to the network, and stop it on exit")
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="HF-format model folder")
    p.add_argument("--served-model-name", default="", metavar="NAME",
                   help="the name the pools serve under (the API's model; default: the --model folder's name)")
    p.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill workers")
    p.add_argument("--decode", type=int, default=1, metavar="M", help="decode workers")
    p.add_argument("--colocated", action="store_true",
                   help="the baseline: workers that do both phases (as many as --decode), no prefill pool")
    p.add_argument("--host", default="127.0.0.1", help="address every service listens on (--platform ray: each node's own address)")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the workers")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.5, help="KV cache of each worker")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--engine", choices=("llm", "sim"), default="llm",
                   help="what the workers run: the model, or the sim engine (performance model, no weights)")
    p.add_argument("--sim-profile", default="llama3-8b-h100",
                   help="sim engine: profile name (services/engine/profiles) or YAML path")
    p.add_argument("--sim-num-blocks", type=int, default=0, metavar="N",
                   help="sim engine: KV blocks of each worker (0: the engine's default)")
    p.add_argument("--llm-pair", action="store_true",
                   help="--platform ray with --engine sim: also one prefill and one decode worker of --model itself, "
                        "served under its folder name (give the sim pools another --served-model-name)")
    p.add_argument("--num-gpus-per-worker", type=float, default=None, metavar="G",
                   help="--platform ray: GPUs each worker replica asks Ray for (default: 1 with a cuda --device, "
                        "else 0)")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="--platform ray: how long a worker that Ray scales in may drain (its requests migrate "
                        "away) before it stops")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="torch threads per CPU worker (0: the cores shared out among the workers)")
    p.add_argument("--kvstore-capacity-gb", type=float, default=0.5, help="memory of the shared KV store")
    p.add_argument("--no-kvstore", action="store_true", help="run without the shared KV store")
    p.add_argument("--no-redis", action="store_true", help="keep scheduler state in memory only")
    p.add_argument("--scheduler-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a `ferry serve scheduler` setting, repeatable (see `ferry serve scheduler --help`), "
                        "e.g. routing-config=round_robin|load_aware|ferry|PATH (the routing preset), "
                        "migration-interval-s=0 (no live migration), migration-load-balance-gap=16, "
                        "metrics-port=9100 (its Prometheus /metrics). "
                        f"{', '.join(SCHEDULER_OWNED)} are set by ferry up")
    p.add_argument("--autoscale", action="store_true",
                   help="let the scheduler size the prefill and decode pools from SLO attainment, queues and KV "
                        "use (starting from --prefill/--decode); scale-in drains first. More knobs: "
                        "--scheduler-arg autoscale-...=")
    p.add_argument("--max-prefill", type=int, default=4, metavar="N", help="--autoscale: prefill workers at most")
    p.add_argument("--max-decode", type=int, default=4, metavar="M", help="--autoscale: decode workers at most")
    p.add_argument("--autoscale-interval", type=float, default=2.0, metavar="S",
                   help="--autoscale: seconds between the scheduler's decisions (and this platform's checks)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="time-to-first-token SLO (gateway metrics, "
                   "autoscaling)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="time-per-output-token SLO (gateway metrics, "
                   "autoscaling)")
    p.add_argument("--log-dir", type=Path, default=None, help="process logs (default: a temporary folder; --platform ray: on each node, by default inside "
                        "the local Ray instance's temp dir, or /tmp/ferry-logs on a cluster)")
    stack_auth.add_arguments(p)
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for the stack")
    return p


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when `ferry up` exits, however that happens."""
    os.setsid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG


@dataclass
class Stack:
    host: str
    log_dir: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], wait_port: int | None = None, timeout: float = 120) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        env = {**MALLOC_ENV, **os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads here)
        self.procs.append((name, proc))
        if wait_port is not None:
            self.wait_port(name, proc, wait_port, timeout)

    def serve(self, name: str, service: str, args: list[str], port: int, timeout: float = 120) -> None:
        self.start(name, [sys.executable, "-m", "services.cli", "serve", service, *args], port, timeout)

    def wait_port(self, name: str, proc: subprocess.Popen, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StartupError(name, f"exited with code {proc.returncode}", self.log_dir / f"{name}.log")
            try:
                with socket.create_connection((self.host, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise StartupError(name, f"not listening on {self.host}:{port} after {timeout:.0f} s",
                           self.log_dir / f"{name}.log")

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise StartupError(name, f"exited with code {proc.returncode}", self.log_dir / f"{name}.log")

    def stop(self) -> None:
        """SIGTERM everything (newest first), wait, then SIGKILL stragglers."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class StartupError(RuntimeError):
    def __init__(self, name: str, what: str, log: Path) -> None:
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        super().__init__(f"{name} {what}; last lines of {log}:\n  " + "\n  ".join(tail))


@dataclass
class WorkerLauncher:
    """Starts worker processes of a pool (prefill | decode | worker, the colocated one) with the stack's
    common flags, named pool-0, pool-1, ... in start order."""
    stack: Stack
    common: list[str]
    started: Counter = field(default_factory=Counter)

    def start(self, pool: str) -> tuple[str, int]:
        """Start one (without waiting for it); returns its process name and gRPC port."""
        port = free_port(self.stack.host)
        service, extra = ("decode", ["--role", "both"]) if pool == "worker" else (pool, [])
        name = f"{pool}-{self.started[pool]}"
        self.started[pool] += 1
        self.stack.serve(name, service, [*self.common, *extra, "--port", str(port)], port=None)
        return name, port


@dataclass
class Launched:
    url: str                                            # the gateway
    scheduler_address: str
    launcher: WorkerLauncher
    workers: dict[str, list[tuple[str, int]]]           # pool -> (process name, gRPC port)


def launch(args: argparse.Namespace, stack: Stack) -> Launched:
    """Start every process; returns once a request can be served."""
    h = args.host
    scheduler_port, kvstore_port = free_port(h), free_port(h)
    redis_url = ""
    redis = shutil.which("redis-server")
    if redis and not args.no_redis:
        redis_port = free_port(h)
        stack.start("redis", [redis, "--port", str(redis_port), "--bind", h, "--save", "", "--appendonly", "no"],
                    redis_port, 30)
        redis_url = f"redis://{h}:{redis_port}/0"
    stack.serve("scheduler", "scheduler",
                scheduler_argv(args, h, scheduler_port, redis_url, f"http://{h}:{args.port}/metrics"), scheduler_port)
    kvstore_address = "" if args.no_kvstore else f"{h}:{kvstore_port}"
    if kvstore_address:
        stack.serve("kvstore", "kvstore", ["--host", h, "--port", str(kvstore_port),
                                           "--capacity-gb", str(args.kvstore_capacity_gb)], kvstore_port)
    pools = {"worker": args.decode} if args.colocated else {"prefill": args.prefill, "decode": args.decode}
    launcher = WorkerLauncher(stack, worker_argv(args, h, f"{h}:{scheduler_port}", kvstore_address,
                                                 sum(pools.values()), os.cpu_count() or 1))
    workers = {pool: [launcher.start(pool) for _ in range(count)] for pool, count in pools.items()}
    for name, port in (w for ws in workers.values() for w in ws):     # they load the model in parallel
        stack.wait_port(name, dict(stack.procs)[name], port, args.ready_timeout)
    stack.serve("gateway", "gateway", gateway_argv(args, h, free_port(h), f"{h}:{scheduler_port}"), args.port)
    url = f"http://{h}:{args.port}"
    wait_models(url, stack, args.ready_timeout)
    return Launched(url, f"{h}:{scheduler_port}", launcher, workers)


def wait_models(url: str, stack: Stack, timeout: float) -> None:
    """Until the gateway lists a model (the workers registered and heartbeat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                if b'"id"' in r.read():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise StartupError("gateway", f"lists no model after {timeout:.0f} s", stack.log_dir / "gateway.log")


def check_args(args: argparse.Namespace) -> str:
    """What is wrong with the command line, before anything starts ("" when nothing)."""
    ray = args.platform == "ray"
    problems = [
        (not (Path(args.model) / "config.json").is_file(),
         f"{args.model} has no config.json; run `make install` first (it builds the model)"),
        (args.prefill < 1 or args.decode < 1, "--prefill and --decode must be >= 1"),
        (args.autoscale and args.colocated,
         "--autoscale sizes the prefill and decode pools; it does not apply to --colocated"),
        (args.max_prefill < args.prefill or args.max_decode < args.decode,
         "--max-prefill/--max-decode must be >= --prefill/--decode"),
        (args.sim_num_blocks < 0, "--sim-num-blocks must be >= 0"),
        (args.address and not ray, "--address names a Ray cluster: use it with --platform ray"),
        (args.colocated and ray, "--colocated runs on --platform local only"),
        (args.llm_pair and not (ray and args.engine == "sim"), "--llm-pair goes with --platform ray --engine sim"),
        (args.llm_pair and served_model_name(args) == Path(args.model).name,
         "--llm-pair serves --model under its folder name: give the sim pools another --served-model-name"),
        (args.num_gpus_per_worker is not None and args.num_gpus_per_worker < 0, "--num-gpus-per-worker must be >= 0"),
        (args.drain_timeout <= 0, "--drain-timeout must be > 0"),
    ]
    for wrong, message in problems:
        if wrong:
            return message
    try:
        scheduler_flags(args.scheduler_arg)    # a bad key stops here, before anything starts
        if args.autoscale:
            autoscale_profile(args)
    except ValueError as e:
        return str(e)
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problem := check_args(args):
        print(f"ferry up: {problem}", file=sys.stderr)
        return 2
    local = args.platform == "local"
    log_dir = (args.log_dir or Path(tempfile.mkdtemp(prefix="ferry-up-"))) if local else args.log_dir
    try:
        secrets_dir = stack_auth.configure(args, log_dir)
    except ValueError as e:
        print(f"ferry up: {e}", file=sys.stderr)
        return 2
    if not local:
        from services.platforms.ray_up import run
        try:
            return run(args)
        finally:
            if secrets_dir is not None:
                shutil.rmtree(secrets_dir, ignore_errors=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ferry up: %(message)s", stream=sys.stderr)
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(args.host, log_dir)
    # Both signals stop the stack, also when SIGINT came in ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        launched = launch(args, stack)
        url = launched.url
        model = served_model_name(args)
        mode = "colocated" if args.colocated else f"{args.prefill} prefill + {args.decode} decode"
        if args.engine == "sim":
            mode += f", sim engine {args.sim_profile}"
        if args.autoscale:
            mode += f", autoscaling up to {args.max_prefill} prefill + {args.max_decode} decode"
        print(f"Ferry is serving {model} ({mode}) at {url}  (logs: {log_dir})\n\n"
              f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"What is the capital of France?\"}}], \"max_tokens\": 32}}'\n\n"
              f"  {stack_auth.admin_env()}ferry admin --scheduler {launched.scheduler_address} instances\n\n"
              "Press Ctrl-C to stop.", flush=True)
        scaler = LocalScaler(stack, launched.launcher, launched.scheduler_address, launched.workers) \
            if args.autoscale else None
        next_scale = time.monotonic()
        while True:
            stack.check_alive()
            if scaler is not None and time.monotonic() >= next_scale:
                try:
                    scaler.tick()
                except grpc.RpcError as e:          # the scheduler restarts: try again next time
                    logging.getLogger("ferry.up").warning("autoscale: scheduler: %s", e.details() or e.code())
                next_scale = time.monotonic() + args.autoscale_interval
            time.sleep(0.2)
    except StartupError as e:
        print(f"ferry up: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nferry up: stopping", file=sys.stderr)
        return 0
    finally:
        stack.stop()
