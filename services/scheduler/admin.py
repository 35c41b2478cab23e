"""``ferry admin``: an operator's hands on a running scheduler, over its gRPC API.

    ferry admin instances                                  every instance: role, health, load, draining
    ferry admin drain decode-0 [--cancel]                  stop routing to it, live-migrate its requests
    ferry admin preempt decode-0 [--in 30 | --at UNIX]     a preemption notice (as a cloud would give):
                                                           drained now, emptied by the deadline

``--scheduler`` (or FERRY_SCHEDULER_ADDRESS) names the scheduler, default 127.0.0.1:50050. Errors come
back as the scheduler's own message and exit status 1 (2 for bad usage).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import grpc

from services.common import grpc_util
from services.gen.ferry.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

ROLES = {common_pb2.ROLE_PREFILL: "prefill", common_pb2.ROLE_DECODE: "decode", common_pb2.ROLE_BOTH: "both"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry admin", description="Operate a running Ferry scheduler.")
    parser.add_argument("--scheduler", default=os.environ.get("FERRY_SCHEDULER_ADDRESS", "127.0.0.1:50050"),
                        help="scheduler host:port (env FERRY_SCHEDULER_ADDRESS)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("instances", help="list the instances the scheduler knows")
    drain = sub.add_parser("drain", help="stop routing to an instance and live-migrate its requests away")
    drain.add_argument("instance")
    drain.add_argument("--cancel", action="store_true", help="route to it again")
    preempt = sub.add_parser("preempt", help="give an instance a preemption notice (spot termination)")
    preempt.add_argument("instance")
    when = preempt.add_mutually_exclusive_group()
    when.add_argument("--in", dest="in_s", type=float, help="seconds until it goes away (default: the "
                      "scheduler's --preemption-grace-s)")
    when.add_argument("--at", type=float, help="Unix time it goes away")
    preempt.add_argument("--source", default="admin", help="who says so (a metrics label)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "preempt" and args.in_s is not None and args.in_s < 0:
        build_parser().error("--in: use seconds >= 0")
    with grpc_util.channel(args.scheduler) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            print(run(stub, args))
        except grpc.RpcError as e:
            print(f"ferry admin {args.action}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def run(stub: scheduler_pb2_grpc.SchedulerStub, args: argparse.Namespace) -> str:
    if args.action == "instances":
        return instances_table(stub.ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=10).instances)
    if args.action == "drain":
        reply = stub.DrainInstance(scheduler_pb2.DrainInstanceRequest(instance_id=args.instance, cancel=args.cancel),
                                   timeout=10)
        return f"{'undrained' if args.cancel else 'draining'} {args.instance} ({reply.num_requests} requests on it)"
    deadline = args.at if args.at is not None else (time.time() + args.in_s if args.in_s is not None else 0.0)
    reply = stub.NotifyPreemption(scheduler_pb2.PreemptionNotice(instance_id=args.instance, deadline_unix_s=deadline,
                                                                 source=args.source), timeout=10)
    when = f"in {deadline - time.time():.0f} s" if deadline else "after the scheduler's grace period"
    return f"preempting {args.instance} {when} ({reply.num_requests} requests to place)"


def instances_table(statuses) -> str:
    rows = [("INSTANCE", "ROLE", "HEALTHY", "DRAINING", "RUNNING", "WAITING", "KV FREE", "ADDRESS")]
    for s in sorted(statuses, key=lambda s: s.instance.instance_id):
        load = s.load
        free = f"{load.num_free_blocks}/{load.num_blocks}" if load.num_blocks else "-"
        rows.append((s.instance.instance_id, ROLES.get(s.instance.role, "?"), "yes" if s.healthy else "no",
                     "yes" if load.draining else "no", str(load.num_running), str(load.num_waiting), free,
                     s.instance.address))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
