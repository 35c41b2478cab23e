"""Content keys of KV blocks: the same prefix has the same keys on every worker and in the kvstore.

Block i's key hashes block i-1's key and block i's token ids (a chain), so a key names the whole
prefix up to the end of its block, not just the block's own tokens:

    tokens:  [t0 .. t15][t16 .. t31][t32 .. t40]
    keys:     k0 = H(ROOT, t0..t15)
              k1 = H(k0,   t16..t31)
              (no key: the last block is not full)

H is BLAKE2b-128 over fixed-width little-endian token ids: stable across processes, machines and
Python versions (unlike `hash()`), and cheap (~1 µs a block).
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

BlockKey = bytes  # 16 bytes; use .hex() on the wire and in logs
ROOT_KEY: BlockKey = b"\x00" * 16


def block_key(parent: BlockKey | None, token_ids: Sequence[int]) -> BlockKey:
    """Key of one full block whose prefix ends with the block keyed `parent` (None for block 0)."""
    h = hashlib.blake2b(parent or ROOT_KEY, digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def chain_keys(token_ids: Sequence[int], block_size: int,
               known: Sequence[BlockKey] = ()) -> list[BlockKey]:
    """Keys of every full block of `token_ids`, extending the `known` keys of its first blocks."""
    keys = list(known)
    parent = keys[-1] if keys else None
    for start in range(len(keys) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start:start + block_size])
        keys.append(parent)
    return keys


def to_hex(keys: Iterable[BlockKey]) -> list[str]:
    return [k.hex() for k in keys]


def from_hex(keys: Iterable[str]) -> list[BlockKey]:
    return [bytes.fromhex(k) for k in keys]
