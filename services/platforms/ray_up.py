"""`ferry up --platform ray`: the whole stack as the Ray Serve application `ferry` (ray_app.py).

    ferry up --platform ray                       # a local Ray instance, closed to the network
    ferry up --platform ray --address auto        # the Ray cluster this machine belongs to
    ferry up --platform ray --address ray://head:10001 --device cuda --autoscale --max-decode 8

It connects to Ray (or starts a local instance: ray_cluster.py), deploys the application, waits until
the gateway lists a model, then stays in the foreground: every second it feeds Ray's view of the
replicas into the scheduler's registry (ray_registry.py) and logs replica-count changes. Scaling is
Ray's: each pool's autoscaling policy follows the scheduler's recommendation (ray_autoscaling.py).
Ctrl-C or SIGTERM deletes the application (workers stop, nothing is left on the cluster) and, for a
local instance, shuts Ray down and removes its files.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import grpc

from services.common import grpc_util
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.platforms import ray_cluster, stack_auth
from services.platforms.ray_app import ControlPlane, build, pools
from services.platforms.ray_registry import gone_instances, live_instances, serve_deployments
from services.platforms.ray_service import APP, free_port
from services.platforms.stack_args import served_model_name

log = logging.getLogger("ferry.up")
DEFAULT_PORTS = {"scheduler_port": 50050, "kvstore_port": 50051, "redis_port": 6380, "sink_port": 50070}
TICK_S = 1.0


def control_plane(cluster: ray_cluster.RayCluster) -> ControlPlane:
    """Ports of the control plane: free ones on this machine for a local instance, the defaults
    (docs/platforms.md) on a cluster's head node."""
    head = ray_cluster.head_node_ip()
    if cluster.is_local:
        return ControlPlane(head, **{name: free_port(head) for name in DEFAULT_PORTS})
    return ControlPlane(head, **DEFAULT_PORTS)


def wait_models(url: str, names: set[str], timeout: float) -> None:
    """Until the gateway lists every served model (their workers registered and heartbeat)."""
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    listed: set[str] = set()
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                listed = {m["id"] for m in json.load(r)["data"]}
            if names <= listed:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the gateway at {url} lists {sorted(listed)} after {timeout:.0f} s, not {sorted(names)}")


class RegistrySync:
    """Each tick: deregister workers whose replica Ray no longer runs; log the pools' replica counts."""

    def __init__(self, scheduler_address: str, pool_names: list[str]) -> None:
        self.channel = grpc_util.channel(scheduler_address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.pool_names = pool_names
        self.counts: dict[str, int] = {}

    def tick(self) -> None:
        deployments = serve_deployments(APP)
        counts = {name: sum(1 for r in deployments.get(name, {}).get("replicas", ())
                            if str(getattr(r["state"], "value", r["state"])) == "RUNNING") for name in self.pool_names}
        for name, n in counts.items():
            if name in self.counts and n != self.counts[name]:
                log.info("ray: %s %d -> %d replicas running", name, self.counts[name], n)
        self.counts = counts
        live = live_instances(deployments)
        registered = [s.instance.instance_id for s in self.stub.ListInstances(
            scheduler_pb2.ListInstancesRequest(), timeout=5).instances]
        for instance_id in gone_instances(registered, self.pool_names, live):
            self.stub.Deregister(scheduler_pb2.DeregisterRequest(instance_id=instance_id), timeout=5)
            log.info("ray: %s has no replica any more: deregistered", instance_id)

    def close(self) -> None:
        self.channel.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ferry up: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    cluster = None
    deployed = False
    try:
        cluster = ray_cluster.start(args.address)     # first: Ray reads its settings when imported
        from ray import serve

        plane = control_plane(cluster)
        log_dir = str(args.log_dir or (cluster.temp_dir / "logs" if cluster.is_local else Path("/tmp/ferry-logs")))
        redis = None if args.no_redis else shutil.which("redis-server")
        serve.start(proxy_location="Disabled")          # Ferry's gateway is the HTTP entry point
        deployed = True
        serve.run(build(args, plane, log_dir, redis, os.cpu_count() or 1), name=APP, route_prefix=None)
        url = f"http://{plane.head_ip}:{args.port}"
        names = {served_model_name(args)} | ({Path(args.model).name} if args.llm_pair else set())
        wait_models(url, names, args.ready_timeout)
        where = "a local Ray instance" if cluster.is_local else f"the Ray cluster at {args.address}"
        print(f"Ferry is serving {', '.join(sorted(names))} on {where} at {url}  (service logs: {log_dir})\n\n"
              f"  curl {url}/v1/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{min(names)}\", \"prompt\": \"The capital of France is\", "
              f"\"max_tokens\": 16}}'\n\n"
              f"  {stack_auth.admin_env()}ferry admin --scheduler {plane.scheduler_address} instances\n\n"
              f"  {ray_cluster.client_env(cluster)} ray status\n\n"
              "Press Ctrl-C to stop.", flush=True)
        sync = RegistrySync(plane.scheduler_address, [p.name for p in pools(args)])
        while True:
            try:
                sync.tick()
            except grpc.RpcError as e:           # the scheduler restarts: Serve brings it back
                log.warning("ray: scheduler: %s", e.details() or e.code())
            time.sleep(TICK_S)
    except KeyboardInterrupt:
        print("\nferry up: stopping", file=sys.stderr)
        return 0
    except Exception as e:  # noqa: BLE001 (a failed start is reported, then everything is torn down)
        print(f"ferry up: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if deployed:
            teardown(cluster.is_local)
        if cluster is not None:
            ray_cluster.stop(cluster)


def interrupt(*_) -> None:
    """Ctrl-C or SIGTERM: stop, once; more of them (a second Ctrl-C) cannot cut the teardown short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def teardown(local: bool) -> None:
    """Delete the application; Serve itself goes too on a local instance (a cluster's may serve others)."""
    from ray import serve

    try:
        serve.delete(APP)
        if local:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 (Ray itself is going away: nothing of ours is left to stop)
        log.warning("ray: teardown: %s", e)
