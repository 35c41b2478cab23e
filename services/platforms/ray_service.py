"""One Ferry service per Ray Serve replica: the replica runs the same `ferry serve ...` process the other
platforms run (workers keep their gRPC servers; nothing of Ferry's traffic goes through Ray), and gives
Ray what it needs to manage it:

    __init__       wait for the services it depends on (Serve handles: their addresses), start the
                   process on this node, return once it listens (Serve then counts the replica RUNNING)
    check_health   Serve's periodic probe: the process is alive and accepts connections; a failure makes
                   Serve replace the replica ("restart failed replicas")
    __del__        Serve stops the replica (scale-in, redeploy, node drain): a worker is drained first —
                   the scheduler live-migrates its requests away — then its process gets SIGTERM (which
                   checkpoints whatever is left); when the whole application is being deleted there is
                   nowhere to move requests to, so it only stops

A worker's instance id is `<deployment>.<replica id>`: the scheduler's registry and Ray's view of the
replicas name the same thing (ray_registry.py keeps them in step).
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ray.serve")
APP = "ferry"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824",
              "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}       # as local.py: see there why
DRAIN_POLL_S = 0.5
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What one deployment's replicas run. `argv` may hold placeholders filled in on the replica:
    {host} (its node's address), {port}, {instance_id}, and {NAME} for each dependency's host:port."""
    name: str                                  # the deployment's name: scheduler, decode, ...
    argv: tuple[str, ...]                      # a `ferry serve` service, or a program (redis-server)
    log_dir: str
    port: int = 0                              # 0: any free port of the node
    is_worker: bool = False                    # registers with the scheduler; drained before it stops
    drain_timeout_s: float = 60.0
    ready_timeout_s: float = 300.0


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the replica's process ends, however it ends."""
    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)      # PR_SET_PDEATHSIG


def fill(argv: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """The command line with its placeholders filled in; other braces stay as they are (pure)."""
    filled = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace(f"{{{key}}}", value)
        filled.append(arg)
    return filled


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start the service's process, its output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, env={**MALLOC_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 (the replica's threads don't fork)


def log_tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []
    return "\n  ".join(text)


class FerryService:
    """The Serve deployment class of every Ferry service (ray_app.py gives each its options)."""

    async def __init__(self, spec: ServiceSpec, dependencies: dict | None = None, members: list | None = None) -> None:
        """`dependencies`: name -> handle of a service this one needs (waited for, its address filled in);
        `members`: the rest of the application, bound to the ingress only so that Serve deploys it."""
        import ray
        from ray import serve

        self.spec = spec
        replica = serve.get_replica_context().replica_id.unique_id
        self.instance_id = f"{spec.name}.{replica}"
        self.host = ray.util.get_node_ip_address()
        self.port = spec.port or free_port(self.host)
        self.listen_address = f"{self.host}:{self.port}"
        self.addresses = {name: await handle.address.remote() for name, handle in (dependencies or {}).items()}
        argv = fill(spec.argv, {"host": self.host, "port": str(self.port), "instance_id": self.instance_id,
                                **self.addresses})
        if argv[0] == "serve":
            argv = [sys.executable, "-m", "services.cli", *argv]
        self.log_path = Path(spec.log_dir) / f"{self.instance_id}.log"
        self.proc = spawn(argv, self.log_path)
        deadline = time.monotonic() + spec.ready_timeout_s
        while not accepts(self.host, self.port, 0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop_process()
                raise RuntimeError(f"{self.instance_id}: {' '.join(argv)} did not start (exit code "
                                   f"{self.proc.returncode}); last lines of {self.log_path}:\n  "
                                   f"{log_tail(self.log_path)}")
            await asyncio.sleep(0.1)
        log.info("%s serves at %s:%d (pid %d)", self.instance_id, self.host, self.port, self.proc.pid)

    async def address(self) -> str:
        return self.listen_address

    async def info(self) -> dict:
        return {"instance_id": self.instance_id, "address": self.listen_address, "pid": self.proc.pid,
                "log": str(self.log_path)}

    async def check_health(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.instance_id} exited with code {self.proc.returncode}; last lines of "
                               f"{self.log_path}:\n  {log_tail(self.log_path)}")
        if not await asyncio.to_thread(accepts, self.host, self.port, 2.0):
            raise RuntimeError(f"{self.instance_id} does not accept connections at {self.listen_address}")

    async def __del__(self) -> None:
        # A dead worker has nothing to drain: the gateways resume its requests elsewhere (WorkerWatch)
        alive = self.proc.poll() is None
        if alive and self.spec.is_worker and "scheduler" in self.addresses and \
                not await asyncio.to_thread(app_deleting):
            await asyncio.to_thread(self.drain)
        await asyncio.to_thread(self.stop_process)

    def drain(self) -> None:
        """Until the scheduler has moved this worker's requests away (or the drain timeout)."""
        import grpc

        from services.common import grpc_util
        from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
        from services.platforms.local_scaler import RPC_TIMEOUT_S, drain_instance, load

        started = time.monotonic()
        with grpc_util.channel(self.addresses["scheduler"]) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            try:
                num = drain_instance(stub, self.instance_id, self.listen_address)
                log.info("%s: Ray stops this replica: draining it (%s requests to move)", self.instance_id,
                         "finishing its" if num is None else num)
                while time.monotonic() - started < self.spec.drain_timeout_s:
                    time.sleep(DRAIN_POLL_S)
                    statuses = stub.ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=RPC_TIMEOUT_S)
                    mine = [s for s in statuses.instances if s.instance.instance_id == self.instance_id]
                    if not mine or load(mine[0]) == 0:
                        log.info("%s drained in %.1f s", self.instance_id, time.monotonic() - started)
                        return
                log.warning("%s still holds requests after the %g s drain timeout; stopping it (SIGTERM "
                            "checkpoints them)", self.instance_id, self.spec.drain_timeout_s)
            except grpc.RpcError as e:
                log.warning("%s: cannot drain through the scheduler (%s); stopping it (SIGTERM checkpoints "
                            "its requests)", self.instance_id, e.details() or e.code())

    def stop_process(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def app_deleting() -> bool:
    """Whether Serve is deleting the whole application (teardown), as opposed to stopping one replica."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    try:
        app = serve.status().applications.get(APP)
    except Exception:  # noqa: BLE001 (the controller is going away: so is the application)
        return True
    return app is None or app.status == ApplicationStatus.DELETING
