"""KV export/import payloads: one request's KV blocks plus everything needed to continue it elsewhere.

Used alike by P→D transfer, multi-stage live migration (a block range per stage), preemption
checkpoints and the kvstore. A payload is JSON-able metadata plus raw block bytes:

    data = block[first_block] | block[first_block+1] | ...      (num_blocks blocks)
    block = K and V of every layer: [layers, 2, block_size, kv_heads, head_dim] in `layout.dtype`

`chunks()` cuts the bytes into pieces of at most 4 MiB for gRPC streams (bytes: protobuf takes no
memoryview); `from_chunks()` joins them (one bytes/bytearray piece is taken as is, without a copy)
and refuses a truncated or oversized payload. `KVLayout.check()` names the first field that differs.
"""
from __future__ import annotations

import array
import base64
import binascii
import json
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields

import torch

from services.engine.config import DTYPES
from services.engine.sampling import SamplingParams

MAX_CHUNK_BYTES = 4 * 2**20


class KVLayoutMismatch(ValueError):
    """The payload's KV was made by a model or cache layout this engine cannot use."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * DTYPES[self.dtype].itemsize

    def check(self, expected: KVLayout) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(expected, f.name)
            if mine != theirs:
                raise KVLayoutMismatch(f"KV layout mismatch: payload has {f.name}={mine!r}, "
                                       f"this engine has {f.name}={theirs!r}")


@dataclass(frozen=True, slots=True)
class KVPayload:
    layout: KVLayout
    request_id: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_computed_tokens: int          # tokens whose KV the source had
    params: SamplingParams
    seed: int                         # with len(token_ids) - num_prompt_tokens: the sampling state
    first_block: int                  # index in the request's block table of the first block here
    num_blocks: int
    block_keys: tuple[str, ...]       # hex keys of this payload's full blocks, in order
    data: bytes | bytearray = b""     # bytearray when assembled from a stream (read_stages)

    def __post_init__(self) -> None:
        if not set(map(type, self.token_ids)) <= {int}:
            raise ValueError(f"KV payload for {self.request_id}: token_ids must be integers")
        expected = self.num_blocks * self.layout.bytes_per_block
        if len(self.data) != expected:
            raise ValueError(f"KV payload for {self.request_id} is {'truncated' if len(self.data) < expected else 'too long'}: "
                             f"{self.num_blocks} blocks need {expected} bytes, got {len(self.data)}")
        if not 0 <= self.num_computed_tokens < len(self.token_ids):
            raise ValueError(f"num_computed_tokens {self.num_computed_tokens} is outside 0..{len(self.token_ids) - 1} "
                             "(the newest token's KV is computed by the next step)")
        if not 0 < self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(f"num_prompt_tokens {self.num_prompt_tokens} is outside 1..{len(self.token_ids)}")
        blocks_with_kv = -(-self.num_computed_tokens // self.layout.block_size)
        if self.first_block < 0 or self.first_block + self.num_blocks > blocks_with_kv:
            raise ValueError(f"blocks {self.first_block}..{self.first_block + self.num_blocks} are outside the "
                             f"{blocks_with_kv} blocks that hold {self.num_computed_tokens} tokens")
        if len(self.block_keys) > self.num_blocks:
            raise ValueError(f"{len(self.block_keys)} block keys for {self.num_blocks} blocks")

    @property
    def is_final(self) -> bool:
        """The payload reaches the request's last block with KV: the request can resume after it."""
        return self.first_block + self.num_blocks == -(-self.num_computed_tokens // self.layout.block_size)

    def blocks(self) -> torch.Tensor:
        """[num_blocks, layers, 2, block_size, kv_heads, head_dim]."""
        if not self.data:
            raw = torch.empty(0, dtype=torch.uint8)
        else:       # a bytearray (from a stream) is used in place; immutable bytes are copied once
            raw = torch.frombuffer(self.data if isinstance(self.data, bytearray) else bytearray(self.data),
                                   dtype=torch.uint8)
        return raw.view(DTYPES[self.layout.dtype]).view(self.num_blocks, *self.layout.block_shape)

    # ---- wire form ----------------------------------------------------------------------
    def meta(self) -> dict:
        """JSON-able metadata. Token ids go as base64 of little-endian uint32s: a migration's final
        stage carries all of a long request's tokens, and a JSON list of 8k numbers costs ms to write
        and read, all of it while the request is suspended."""
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("data", "token_ids")}
        ids = array.array("I", self.token_ids)
        if sys.byteorder != "little":
            ids.byteswap()
        meta["token_ids_b64"] = base64.b64encode(ids.tobytes()).decode()
        meta["layout"] = asdict(self.layout)
        meta["params"] = asdict(self.params)
        return meta

    def chunks(self, max_bytes: int = MAX_CHUNK_BYTES) -> Iterator[bytes]:
        view = memoryview(self.data)
        for start in range(0, len(view), max_bytes):
            yield bytes(view[start:start + max_bytes])

    @classmethod
    def from_chunks(cls, meta: dict, chunks: Iterable[bytes | bytearray]) -> KVPayload:
        parts = list(chunks)
        one = len(parts) == 1 and type(parts[0]) in (bytes, bytearray)
        data = parts[0] if one else b"".join(parts)     # a single piece: no copy
        try:
            layout = KVLayout(**meta["layout"])
            params = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()})
            rest = {k: v for k, v in meta.items() if k not in ("layout", "params")}
            if "token_ids_b64" in rest:
                rest["token_ids"] = tuple(_uint32s(rest.pop("token_ids_b64")))
            else:
                rest["token_ids"] = tuple(rest["token_ids"])
            rest["block_keys"] = tuple(rest["block_keys"])
            return cls(layout=layout, params=params, data=data, **rest)
        except (KeyError, TypeError, binascii.Error) as e:
            raise ValueError(f"malformed KV payload metadata: {e}") from None

    def encode(self) -> bytes:
        header = json.dumps(self.meta()).encode()
        return struct.pack("<I", len(header)) + header + self.data

    @classmethod
    def decode(cls, raw: bytes) -> KVPayload:
        if len(raw) < 4:
            raise ValueError("KV payload truncated: no header")
        (n,) = struct.unpack_from("<I", raw)
        try:
            meta = json.loads(raw[4:4 + n])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"KV payload header is not valid JSON: {e}") from None
        return cls.from_chunks(meta, [raw[4 + n:]])


def _uint32s(text: str) -> array.array:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError(f"token_ids_b64 holds {len(raw)} bytes, not a whole number of uint32s")
    values = array.array("I")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values
