"""`ferry serve kvstore`: the shared KV-cache store (memory LRU, optional disk tier, /metrics).

    ferry serve kvstore --port 50051 --capacity-gb 4 --disk-dir /var/cache/ferry-kv --disk-capacity-gb 64
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.common.lifecycle import run_service
from services.common.settings import parse_settings, setting
from services.kvstore.server import create_server, start_metrics_server
from services.kvstore.store import KVBlockStore

log = logging.getLogger("ferry.kvstore")
GIB = 2**30


@dataclass(frozen=True, slots=True)
class KVStoreSettings:
    host: str = setting("127.0.0.1", "address to listen on (gRPC and metrics)")
    port: int = setting(50051, "gRPC port (0 = any free port)")
    capacity_gb: float = setting(1.0, "memory budget for KV blocks, in GiB")
    disk_dir: str = setting("", "directory of the disk tier that least recently used blocks spill to "
                            "(empty = no disk tier: they are dropped)")
    disk_capacity_gb: float = setting(0.0, "disk tier budget in GiB (needs --disk-dir)")
    metrics_port: int = setting(-1, "port of the Prometheus /metrics endpoint (-1 = off, 0 = any free port)")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}: set --port")
        if not self.capacity_gb > 0:
            raise ValueError(f"capacity_gb must be > 0, got {self.capacity_gb}: set --capacity-gb to the "
                             "GiB of memory the store may use, e.g. --capacity-gb 1")
        if int(self.capacity_gb * GIB) < 1:
            raise ValueError(f"capacity_gb {self.capacity_gb} is less than one byte: set a larger --capacity-gb")
        if not self.disk_capacity_gb >= 0:
            raise ValueError(f"disk_capacity_gb must be >= 0, got {self.disk_capacity_gb}: set --disk-capacity-gb")
        if self.disk_dir and self.disk_capacity_gb == 0:
            raise ValueError("disk_dir is set but disk_capacity_gb is 0: set --disk-capacity-gb to the disk "
                             "tier's size in GiB, or leave --disk-dir empty for no disk tier")
        if self.disk_capacity_gb > 0 and not self.disk_dir:
            raise ValueError("disk_capacity_gb is set but disk_dir is empty: set --disk-dir to a directory "
                             "for the disk tier, or --disk-capacity-gb 0")
        if self.metrics_port != -1 and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be -1 (off) or in 0..65535, got {self.metrics_port}: "
                             "set --metrics-port")


async def serve(settings: KVStoreSettings, stop: asyncio.Event) -> None:
    store = KVBlockStore(int(settings.capacity_gb * GIB), settings.disk_dir or None,
                         int(settings.disk_capacity_gb * GIB))
    server, port, servicer = create_server(store, settings.host, settings.port)
    metrics = None
    if settings.metrics_port != -1:
        metrics, metrics_port = start_metrics_server(servicer, settings.host, settings.metrics_port)
        log.info("kvstore metrics on http://%s:%d/metrics", settings.host, metrics_port)
    await server.start()
    disk = f"disk tier {settings.disk_dir} ({settings.disk_capacity_gb} GiB)" if store.has_disk else "no disk tier"
    log.info("kvstore listening on %s:%d (memory %s GiB, %s)", settings.host, port, settings.capacity_gb, disk)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=2)
        if metrics is not None:
            await asyncio.to_thread(metrics.shutdown)
            metrics.server_close()
        log.info("kvstore stopped")


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(KVStoreSettings, argv, prog="ferry serve kvstore", env_prefix="FERRY_KVSTORE_",
                              description="The shared KV-cache store: full KV blocks by chained content "
                                          "key, in a memory LRU with an optional disk tier.")
    return run_service("kvstore", lambda stop: serve(settings, stop))
