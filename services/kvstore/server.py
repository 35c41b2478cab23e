"""The KVStore gRPC service (proto/ferry/v1/kvstore.proto) over a `KVBlockStore`, and its metrics.

    Put(stream KVBlock) -> PutReply        store each block; blocks already present are kept
    Get(BlockKeys) -> stream KVBlock       leading blocks of `keys`, stopping at the first missing one
    Lookup / Evict / Stats                 unary

Requests are checked before the store sees them (namespace non-empty, keys 16 bytes, data non-empty):
a bad one ends with INVALID_ARGUMENT and a message that says what to fix. With a disk tier, store calls
that may read or write files run in a worker thread so the event loop keeps serving other calls.
Metrics are read from `store.stats` at scrape time by a custom collector, so they are always current.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import grpc_util
from services.gen.ferry.v1 import kvstore_pb2 as pb
from services.gen.ferry.v1 import kvstore_pb2_grpc as pb_grpc
from services.kvstore.store import KVBlockStore

log = logging.getLogger(__name__)
KEY_BYTES = 16
T = TypeVar("T")


def check_request(namespace: str, keys: Sequence[bytes], first_index: int = 0) -> str | None:
    """What is wrong with a request's namespace and keys, or None if nothing."""
    if not namespace:
        return "namespace is empty: set it to the name of the KV layout (model, dtype, block size, layers)"
    for i, key in enumerate(keys, first_index):
        if len(key) != KEY_BYTES:
            return (f"key {i} is {len(key)} bytes: block keys must be exactly {KEY_BYTES} bytes "
                    "(services.common.block_keys.chain_keys makes them)")
    return None


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, store: KVBlockStore) -> None:
        self.store = store
        self.requests: collections.Counter[str] = collections.Counter()
        self.bytes_received = 0
        self.bytes_sent = 0

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call that may touch disk off the event loop (memory-only calls stay inline)."""
        if self.store.has_disk:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def Put(self, request_iterator: AsyncIterator[pb.KVBlock],
                  context: grpc.aio.ServicerContext) -> pb.PutReply:
        self.requests["Put"] += 1
        stored = present = 0
        index = 0
        async for block in request_iterator:
            problem = check_request(block.namespace, [block.key], index)
            if problem is None and not block.data:
                problem = f"block {index} has no data: send the block's KV bytes"
            if problem is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            self.bytes_received += len(block.data)
            try:
                added = await self._call(self.store.put, block.namespace, block.key, block.data)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"block {index}: {e}")
            stored += added
            present += not added
            index += 1
        return pb.PutReply(num_stored=stored, num_present=present)

    async def Get(self, request: pb.BlockKeys, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.KVBlock]:
        self.requests["Get"] += 1
        problem = check_request(request.namespace, request.keys)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        for key in request.keys:
            data = await self._call(self.store.get, request.namespace, key)
            if data is None:
                return
            self.bytes_sent += len(data)
            yield pb.KVBlock(namespace=request.namespace, key=key, data=data)

    async def Lookup(self, request: pb.BlockKeys, context: grpc.aio.ServicerContext) -> pb.LookupReply:
        self.requests["Lookup"] += 1
        problem = check_request(request.namespace, request.keys)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return pb.LookupReply(num_hit=self.store.lookup(request.namespace, request.keys))  # index only

    async def Evict(self, request: pb.BlockKeys, context: grpc.aio.ServicerContext) -> pb.EvictReply:
        self.requests["Evict"] += 1
        problem = check_request(request.namespace, request.keys)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        evicted = await self._call(self.store.evict, request.namespace, list(request.keys))
        return pb.EvictReply(num_evicted=evicted)

    async def Stats(self, request: pb.KVStoreStatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.KVStoreStats:
        self.requests["Stats"] += 1
        s = self.store.stats
        return pb.KVStoreStats(num_blocks=s.num_blocks, num_bytes=s.num_bytes, capacity_bytes=s.capacity_bytes,
                               num_disk_blocks=s.num_disk_blocks, num_disk_bytes=s.num_disk_bytes,
                               num_hits=s.num_hits, num_misses=s.num_misses, num_evictions=s.num_evictions)


def create_server(store: KVBlockStore, host: str, port: int) -> tuple[grpc.aio.Server, int, KVStoreServicer]:
    """A grpc.aio server bound to host:port (0 = any free port), not yet started; returns the bound port."""
    server = grpc_util.aio_server()
    servicer = KVStoreServicer(store)
    pb_grpc.add_KVStoreServicer_to_server(servicer, server)
    return server, grpc_util.bind(server, host, port), servicer


class StoreCollector(Collector):
    """Prometheus metrics read from the store and servicer at each scrape."""

    def __init__(self, servicer: KVStoreServicer) -> None:
        self.servicer = servicer

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.servicer.store.stats
        gauges = [("blocks", "KV blocks in memory", s.num_blocks),
                  ("bytes", "bytes of KV blocks in memory", s.num_bytes),
                  ("capacity_bytes", "memory budget in bytes", s.capacity_bytes),
                  ("disk_blocks", "KV blocks in the disk tier", s.num_disk_blocks),
                  ("disk_bytes", "bytes of KV blocks in the disk tier", s.num_disk_bytes),
                  ("disk_capacity_bytes", "disk tier budget in bytes (0: no disk tier)", s.disk_capacity_bytes)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"ferry_kvstore_{name}", doc, value=value)
        counters = [("hits", "Get keys found", s.num_hits),
                    ("misses", "Get keys not found", s.num_misses),
                    ("evictions", "blocks dropped for lack of room", s.num_evictions),
                    ("received_bytes", "block bytes received by Put", self.servicer.bytes_received),
                    ("sent_bytes", "block bytes sent by Get", self.servicer.bytes_sent)]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"ferry_kvstore_{name}", doc, value=value)
        requests = CounterMetricFamily("ferry_kvstore_requests", "RPCs by method", labels=["method"])
        for method in ("Put", "Get", "Lookup", "Evict", "Stats"):
            requests.add_metric([method], self.servicer.requests[method])
        yield requests


def start_metrics_server(servicer: KVStoreServicer, host: str, port: int) -> tuple[Any, int]:
    """Serve /metrics on host:port in a daemon thread; returns (http server, bound port)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StoreCollector(servicer))
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    return httpd, httpd.server_port
