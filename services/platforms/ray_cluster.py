"""The Ray instance `ferry up --platform ray` runs on: one it connects to (`--address`), or a local one
that it starts closed to the network and removes without a trace when it stops.

A local instance
  - listens on loopback only: Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; on
    Linux Ray would otherwise bind the machine's routable address), so no other host can join or call it;
  - authenticates every connection with a token (RAY_AUTH_MODE=token), fresh for each start and kept in
    a 0600 file of its own temp dir (never ~/.ray);
  - reports no usage data (RAY_USAGE_STATS_ENABLED=0): nothing leaves the machine;
  - runs no dashboard, and keeps every file (sockets, logs, spilled objects, Ferry's service logs) under
    one temp dir that `stop()` removes after Ray's processes are gone.

An existing cluster keeps its own settings (docs/platforms.md says how to start one for a closed
network); the driver only turns its own usage reporting off and finds the head node.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ferry.up")
ROOT = Path(__file__).resolve().parents[2]
HEAD_RESOURCE = "node:__internal_head__"       # every Ray head node has this resource (Ray's own name)
OBJECT_STORE_BYTES = 200 * 2**20               # Ferry moves no data through Ray's object store


@dataclass
class RayCluster:
    address: str              # what the driver connected to ("": the local instance it started)
    temp_dir: Path | None     # the local instance's files (None: an existing cluster's)

    @property
    def is_local(self) -> bool:
        return self.temp_dir is not None


def closed_network_env(temp_dir: Path) -> dict[str, str]:
    """Environment of a local Ray instance (its processes inherit the driver's): loopback, token auth with
    a fresh token in `temp_dir`, no usage reporting, and Ferry importable by every Ray worker."""
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def start(address: str = "") -> RayCluster:
    """Connect to `address`, or start a local instance when it is empty. Ray reads its settings from the
    environment when first imported, so nothing may import ray before this."""
    if "ray" in sys.modules:
        raise RuntimeError("ray was imported before its settings were made (services/platforms/ray_cluster.py)")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ferry's service token and TLS folder (services/common/service_auth.py, service_tls.py): the files must
    # be at those paths on every node
    forwarded = {k: os.environ[k] for k in ("FERRY_SERVICE_TOKEN_FILE", "FERRY_TLS_DIR") if os.environ.get(k)}
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", **forwarded}}
    if address:
        import ray
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        return RayCluster(address, None)
    # Short: Ray's Unix socket paths live under it (at most 107 bytes)
    temp_dir = Path(tempfile.mkdtemp(prefix="ferry-ray-", dir="/tmp"))
    try:
        os.environ.update(closed_network_env(temp_dir))
        import ray
        ray.init(_temp_dir=str(temp_dir / "ray"), include_dashboard=False, log_to_driver=False,
                 object_store_memory=OBJECT_STORE_BYTES, runtime_env=runtime_env)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return RayCluster("", temp_dir)


def stop(cluster: RayCluster) -> None:
    """Disconnect; a local instance is shut down (all its processes) and its temp dir removed."""
    import ray

    ray.shutdown()
    if cluster.temp_dir is not None:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def client_env(cluster: RayCluster) -> str:
    """The environment a Ray client (`ray status`, a driver) needs to reach this cluster, as shell words."""
    import ray

    env = {"RAY_ADDRESS": cluster.address or ray.get_runtime_context().gcs_address}
    if cluster.temp_dir is not None:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.environ["RAY_AUTH_TOKEN_PATH"]}
    return " ".join(f"{k}={v}" for k, v in env.items())


def head_node_ip() -> str:
    """The head node's address (where the control plane runs: see ray_app.py)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and HEAD_RESOURCE in node.get("Resources", {}):
            return node["NodeManagerAddress"]
    raise RuntimeError("the Ray cluster reports no live head node")
