"""`ferry up --autoscale`: the local platform carries out the scheduler's replica recommendations.

Each tick it asks the scheduler for `GetScaleRecommendations` and compares `desired` with the worker
processes it runs per pool (those still starting count: a recommendation is an absolute size):

    more wanted    start workers; they register with the scheduler by themselves
    fewer wanted   drain the least-loaded worker of the pool (DrainInstance: the scheduler live-migrates
                   its requests away; with live migration off, the worker's own Drain lets them finish in
                   place), and stop its process once it holds no request — so scale-in loses nothing

One drain per pool at a time, as the autoscaler removes one replica per decision. The scaler decides
nothing itself: it only applies what the scheduler recommends.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import time
from dataclasses import dataclass, field

import grpc

from services.common import grpc_util
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger("ferry.up")
RPC_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 15.0
DRAIN_SETTLE_S = 2.0      # a request routed just before the drain may still be on its way to the worker


@dataclass
class Drain:
    pool: str
    name: str
    address: str
    since: float


@dataclass
class LocalScaler:
    stack: object                          # local.Stack (procs, host)
    launcher: object                       # local.WorkerLauncher
    scheduler_address: str
    workers: dict[str, list[tuple[str, int]]]      # pool -> (process name, port), draining ones excluded
    drains: list[Drain] = field(default_factory=list)

    def tick(self) -> None:
        with grpc_util.channel(self.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            statuses = {s.instance.address: s for s in stub.ListInstances(
                scheduler_pb2.ListInstancesRequest(), timeout=RPC_TIMEOUT_S).instances}
            self.finish_drains(statuses)
            recommendations = stub.GetScaleRecommendations(scheduler_pb2.ScaleRecommendationsRequest(),
                                                           timeout=RPC_TIMEOUT_S)
            for rec in recommendations.pools:
                if rec.pool not in self.workers:
                    continue
                have = len(self.workers[rec.pool])
                if rec.desired > have:
                    for _ in range(rec.desired - have):
                        self.workers[rec.pool].append(self.launcher.start(rec.pool))
                    log.info("autoscale: %s %d -> %d (%s)", rec.pool, have, rec.desired, rec.reason)
                elif rec.desired < have and not any(d.pool == rec.pool for d in self.drains):
                    self.start_drain(stub, rec, statuses)

    def start_drain(self, stub, rec, statuses) -> None:
        """Drain the registered worker of the pool with the fewest requests."""
        host = self.stack.host
        candidates = [(load(statuses[f"{host}:{port}"]), name, port) for name, port in self.workers[rec.pool]
                      if f"{host}:{port}" in statuses]
        if not candidates:
            return
        _, name, port = min(candidates)
        address = f"{host}:{port}"
        drain_instance(stub, statuses[address].instance.instance_id, address)
        self.workers[rec.pool].remove((name, port))
        self.drains.append(Drain(rec.pool, name, address, time.monotonic()))
        log.info("autoscale: %s %d -> %d (%s): draining %s", rec.pool, len(self.workers[rec.pool]) + 1,
                 rec.desired, rec.reason, name)

    def finish_drains(self, statuses) -> None:
        """Stop the process of every drained worker that holds no request any more."""
        for drain in list(self.drains):
            status = statuses.get(drain.address)
            if status is not None and (load(status) > 0 or time.monotonic() - drain.since < DRAIN_SETTLE_S):
                continue
            self.drains.remove(drain)
            procs = dict(self.stack.procs)
            proc = procs.get(drain.name)
            self.stack.procs[:] = [(n, p) for n, p in self.stack.procs if n != drain.name]
            if proc is not None:
                stop_process(proc)
            log.info("autoscale: %s drained in %.1f s and stopped", drain.name, time.monotonic() - drain.since)


def drain_instance(stub: scheduler_pb2_grpc.SchedulerStub, instance_id: str, address: str) -> int | None:
    """Stop routing to a worker and move its requests away: the scheduler live-migrates them (returns
    how many it held); with live migration off, the worker's own Drain lets them finish in place (None)."""
    try:
        return stub.DrainInstance(scheduler_pb2.DrainInstanceRequest(instance_id=instance_id),
                                  timeout=RPC_TIMEOUT_S).num_requests
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:       # live migration off: drain in place
            raise
        with grpc_util.channel(address) as channel:
            worker_pb2_grpc.WorkerStub(channel).Drain(worker_pb2.DrainRequest(), timeout=RPC_TIMEOUT_S)
        return None


def load(status: scheduler_pb2.InstanceStatus) -> int:
    return max(status.load.num_running + status.load.num_waiting, len(status.load.requests))


def stop_process(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
