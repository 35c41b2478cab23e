"""Ferry as one Ray Serve application, `ferry`: a deployment per service, each replica one process.

    redis ─ scheduler ─┬─ kvstore
                       ├─ prefill, decode            the pools (autoscaled: ray_autoscaling.py)
                       ├─ prefill-llm, decode-llm    --llm-pair: one worker each of the real model
                       └─ gateway (the ingress)      binds every other deployment, so Serve deploys them

The control plane (redis, scheduler, kvstore, gateway) is pinned to the head node at fixed ports, so a
replica Serve restarts comes back at the same address and workers, gateway and users keep reaching it.
Workers go wherever Ray finds their resources (`num_gpus` per worker, CPU 0: Ferry's processes share
the machine's cores themselves), pick a free port there, and register with the scheduler by themselves.
Dependencies are Serve handles: a replica starts its process once those it needs answer `address()`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from services.platforms.ray_cluster import HEAD_RESOURCE
from services.platforms.ray_service import STOP_TIMEOUT_S, FerryService, ServiceSpec
from services.platforms.stack_args import gateway_argv, scheduler_argv, worker_argv

HEALTH = {"health_check_period_s": 2.0, "health_check_timeout_s": 30.0}
CONTROL_PLANE = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
POLICY = "services.platforms.ray_autoscaling:FollowScheduler"


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """Where the control plane listens: the head node's address and a port per service."""
    head_ip: str
    scheduler_port: int
    kvstore_port: int
    redis_port: int
    sink_port: int

    @property
    def scheduler_address(self) -> str:
        return f"{self.head_ip}:{self.scheduler_port}"


@dataclass(frozen=True, slots=True)
class Pool:
    name: str               # the deployment
    role: str               # prefill | decode: the scheduler's pool (autoscaled ones only)
    replicas: int
    max_replicas: int
    engine: str
    autoscaled: bool        # the scheduler sizes it (between 1 and max_replicas)


def pools(args: argparse.Namespace) -> list[Pool]:
    max_p, max_d = (args.max_prefill, args.max_decode) if args.autoscale else (args.prefill, args.decode)
    out = [Pool("prefill", "prefill", args.prefill, max_p, args.engine, args.autoscale),
           Pool("decode", "decode", args.decode, max_d, args.engine, args.autoscale)]
    if args.llm_pair:
        out += [Pool("prefill-llm", "prefill", 1, 1, "llm", False), Pool("decode-llm", "decode", 1, 1, "llm", False)]
    return out


def worker_options(args: argparse.Namespace, pool: Pool, plane: ControlPlane) -> dict:
    gpus = args.num_gpus_per_worker if args.num_gpus_per_worker is not None else \
        (1.0 if args.device.startswith("cuda") and pool.engine == "llm" else 0.0)
    options = {"name": pool.name, "ray_actor_options": {"num_cpus": 0, "num_gpus": gpus},
               "graceful_shutdown_timeout_s": args.drain_timeout + STOP_TIMEOUT_S + 5, **HEALTH}
    if pool.autoscaled:
        options["autoscaling_config"] = {
            "min_replicas": 1, "max_replicas": pool.max_replicas, "initial_replicas": pool.replicas,
            "upscale_delay_s": 0, "downscale_delay_s": 0,           # the scheduler's hysteresis already held
            "policy": {"policy_function": POLICY,
                       "policy_kwargs": {"scheduler_address": plane.scheduler_address, "pool": pool.role,
                                         "interval_s": min(1.0, args.autoscale_interval)}}}
    else:
        options["num_replicas"] = pool.replicas
    return options


def build(args: argparse.Namespace, plane: ControlPlane, log_dir: str, redis_server: str | None, cpu_count: int):
    """The application to `serve.run` (`redis_server`: its path on the head node, None: no Redis)."""
    from ray import serve

    service = serve.deployment(FerryService)

    def spec(name: str, argv: list[str], port: int = 0, **kw) -> ServiceSpec:
        return ServiceSpec(name, tuple(argv), log_dir, port, ready_timeout_s=args.ready_timeout, **kw)

    def control(name: str, argv: list[str], port: int, **dependencies):
        return service.options(name=name, num_replicas=1, ray_actor_options=CONTROL_PLANE,
                                    graceful_shutdown_timeout_s=STOP_TIMEOUT_S + 5, **HEALTH) \
            .bind(spec(name, argv, port), dependencies)

    scheduler_deps = {}
    if redis_server:
        scheduler_deps["redis"] = control("redis", [redis_server, "--port", "{port}", "--bind", "{host}", "--save",
                                                    "", "--appendonly", "no"], plane.redis_port)
    scheduler = control("scheduler", ["serve", "scheduler", *scheduler_argv(
        args, "{host}", plane.scheduler_port, "redis://{redis}/0" if redis_server else "",
        f"http://{{host}}:{args.port}/metrics")], plane.scheduler_port, **scheduler_deps)
    worker_deps = {"scheduler": scheduler}
    if not args.no_kvstore:
        worker_deps["kvstore"] = control("kvstore", ["serve", "kvstore", "--host", "{host}", "--port", "{port}",
                                                     "--capacity-gb", str(args.kvstore_capacity_gb)], plane.kvstore_port)
    all_pools = pools(args)
    num_llm = sum(p.max_replicas for p in all_pools if p.engine == "llm")
    members = [*worker_deps.values()]
    for pool in all_pools:
        argv = ["serve", pool.role, *worker_argv(args, "{host}", "{scheduler}", "{kvstore}" if "kvstore" in worker_deps
                                                 else "", num_llm, cpu_count, pool.engine),
                "--port", "{port}", "--instance-id", "{instance_id}"]
        members.append(service.options(**worker_options(args, pool, plane)).bind(
            spec(pool.name, argv, is_worker=True, drain_timeout_s=args.drain_timeout), worker_deps))
    gateway = spec("gateway", ["serve", "gateway", *gateway_argv(args, "{host}", plane.sink_port, "{scheduler}")],
                   args.port)
    return service.options(name="gateway", num_replicas=1, ray_actor_options=CONTROL_PLANE,
                                graceful_shutdown_timeout_s=STOP_TIMEOUT_S + 5, **HEALTH) \
        .bind(gateway, {"scheduler": scheduler}, members)
