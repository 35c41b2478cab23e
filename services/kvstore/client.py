"""`KVStoreClient`: async client of the KVStore service, for workers that share KV blocks.

    async with KVStoreClient("127.0.0.1:50051") as kv:
        n = await kv.lookup(ns, keys)                  # leading keys the store holds
        blocks = await kv.get(ns, keys[:n])            # their bytes, in order
        stored, present = await kv.put(ns, [(key, data), ...])

Create it inside a running event loop (grpc.aio channels belong to one loop). Errors surface as
`grpc.aio.AioRpcError` (e.g. INVALID_ARGUMENT for a key that is not 16 bytes, UNAVAILABLE when no
store listens).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Self

from services.common import grpc_util
from services.gen.ferry.v1 import kvstore_pb2 as pb
from services.gen.ferry.v1 import kvstore_pb2_grpc as pb_grpc


class KVStoreClient:
    def __init__(self, address: str, *, timeout: float | None = None) -> None:
        """`timeout`: seconds per call (None = no deadline)."""
        self.address = address
        self.timeout = timeout
        self._channel = grpc_util.aio_channel(address)
        self._stub = pb_grpc.KVStoreStub(self._channel)

    async def lookup(self, namespace: str, keys: Sequence[bytes]) -> int:
        """How many leading `keys` the store holds."""
        reply = await self._stub.Lookup(pb.BlockKeys(namespace=namespace, keys=keys), timeout=self.timeout)
        return reply.num_hit

    async def get(self, namespace: str, keys: Sequence[bytes]) -> list[bytes]:
        """The data of the leading `keys` the store holds, in order (stops at the first missing key)."""
        call = self._stub.Get(pb.BlockKeys(namespace=namespace, keys=keys), timeout=self.timeout)
        return [block.data async for block in call]

    async def put(self, namespace: str, blocks: Iterable[tuple[bytes, bytes]]) -> tuple[int, int]:
        """Store (key, data) blocks; returns (num_stored, num_already_present)."""
        def messages() -> Iterator[pb.KVBlock]:
            for key, data in blocks:
                yield pb.KVBlock(namespace=namespace, key=key, data=data)

        reply = await self._stub.Put(messages(), timeout=self.timeout)
        return reply.num_stored, reply.num_present

    async def evict(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove blocks; returns how many the store held."""
        reply = await self._stub.Evict(pb.BlockKeys(namespace=namespace, keys=keys), timeout=self.timeout)
        return reply.num_evicted

    async def stats(self) -> pb.KVStoreStats:
        return await self._stub.Stats(pb.KVStoreStatsRequest(), timeout=self.timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
