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
KEY_HEX_CHARS = 32                  # a 16-byte block key (services.common.block_keys), in hex
HEX_DIGITS = frozenset("0123456789abcdef")


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

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or self.dtype not in DTYPES:
            raise ValueError(f"malformed KV layout: model_id must be a string and dtype one of {', '.join(DTYPES)}; "
                             f"got {self.model_id!r}, {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"malformed KV layout: {name} must be a positive integer, got {getattr(self, name)!r}")

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
        for name in ("num_prompt_tokens", "num_computed_tokens", "seed", "first_block", "num_blocks"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"KV payload for {self.request_id}: {name} must be an integer, "
                                 f"got {getattr(self, name)!r}")
        if not all(isinstance(k, str) and len(k) == KEY_HEX_CHARS and set(k) <= HEX_DIGITS for k in self.block_keys):
            raise ValueError(f"KV payload for {self.request_id}: block keys must be {KEY_HEX_CHARS} hex digits "
                             "(16-byte chained keys)")
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
            params = _params(meta["params"])
            rest = {k: v for k, v in meta.items() if k not in ("layout", "params")}
            if "token_ids_b64" in rest:
                rest["token_ids"] = tuple(_uint32s(rest.pop("token_ids_b64")))
            else:
                rest["token_ids"] = tuple(rest["token_ids"])
            rest["block_keys"] = tuple(rest["block_keys"])
            return cls(layout=layout, params=params, data=data, **rest)
        except (KeyError, TypeError, AttributeError, binascii.Error) as e:
            raise ValueError(f"malformed KV payload metadata: {e!r}") from None

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
        except (ValueError, RecursionError) as e:       # incl. UnicodeDecodeError, JSONDecodeError
            raise ValueError(f"KV payload header is not valid JSON: {e!r}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"KV payload header must be a JSON object, got {type(meta).__name__}")  # noqa: TRY004 (one error type for any malformed payload)
        return cls.from_chunks(meta, [raw[4 + n:]])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each sampling field of a payload from the wire must be: a wrong type would pass SamplingParams'
# checks and fail later, inside an engine step, where it takes down every request of the batch.
PARAM_TYPES = {"max_tokens": _is_int, "temperature": lambda v: _is_int(v) or isinstance(v, float),
               "top_p": lambda v: _is_int(v) or isinstance(v, float), "top_k": lambda v: v is None or _is_int(v),
               "seed": lambda v: v is None or _is_int(v),
               "stop": lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v),
               "stop_token_ids": lambda v: isinstance(v, (list, tuple)) and all(_is_int(t) and t >= 0 for t in v),
               "ignore_eos": lambda v: isinstance(v, bool)}


def _params(fields: object) -> SamplingParams:
    if not isinstance(fields, dict):
        raise ValueError(  # noqa: TRY004 (one error type for any malformed payload)
            f"malformed KV payload metadata: params must be an object, got {type(fields).__name__}")
    for name, value in fields.items():
        if name not in PARAM_TYPES or not PARAM_TYPES[name](value):
            raise ValueError(f"malformed KV payload metadata: params.{name} = {value!r}")
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _uint32s(text: str) -> array.array:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError(f"token_ids_b64 holds {len(raw)} bytes, not a whole number of uint32s")
    values = array.array("I")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values
