"""Ray's view of the replicas feeds the scheduler's registry.

Heartbeats tell the scheduler that a worker lives; only Ray knows first that one is gone: Serve replaced
a replica whose health check failed, a node died, a replica was stopped. Every tick `ferry up
--platform ray` reads Serve's replica list and deregisters each worker of a Ray-run pool whose replica
Ray no longer has, so routing stops at once instead of after the heartbeat timeout (a worker that is in
fact alive is told `known: false` at its next heartbeat and registers again).

A worker's instance id is `<deployment>.<replica id>` (ray_service.py), so the two views join on it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

# Serve replica states in which the replica (and its worker) may still hold requests
LIVE_STATES = frozenset({"STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING", "PENDING_MIGRATION"})


def instance_id(deployment: str, replica_id: str) -> str:
    return f"{deployment}.{replica_id}"


def live_instances(deployments: Mapping[str, Mapping]) -> set[str]:
    """Instance ids of the replicas Ray runs, from Serve's application details (`deployments` of one
    application: name -> {"replicas": [{"replica_id", "state"}, ...]})."""
    return {instance_id(name, r["replica_id"]) for name, d in deployments.items() for r in d.get("replicas", ())
            if str(getattr(r["state"], "value", r["state"])) in LIVE_STATES}


def gone_instances(registered: Iterable[str], pools: Iterable[str], live: set[str]) -> list[str]:
    """Registered instances of Ray-run `pools` whose replica Ray no longer runs (pure)."""
    pools = set(pools)
    return sorted(i for i in registered if i.rpartition(".")[0] in pools and i not in live)


def serve_deployments(app: str) -> dict[str, Mapping]:
    """Serve's details of `app`'s deployments (the controller's own view; Serve's dashboard reads the same)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return details.get("applications", {}).get(app, {}).get("deployments", {})
