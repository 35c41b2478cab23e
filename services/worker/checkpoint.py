"""KV checkpoint on the way out (SpotServe's "checkpoint" option), on the engine thread.

A worker that stops (SIGTERM: a spot preemption deadline, a scale-down) with requests it could not
migrate writes each one's full KV blocks to the kvstore under the same chained keys the prefill path
looks up, then tells the gateway to resume it elsewhere (TokenEvent finish_reason "resume"):

    request here:  [prompt ........ | output so far ......... g]     (g: sampled, its KV not computed)
    checkpoint:    [blk 0][blk 1] … [blk k-1]                        full computed blocks, keyed by
                                                                     chain_keys(token ids), k = computed // bs
    the gateway's resumed Prefill (prompt + output so far) finds blocks 0..k-1 in the kvstore: a prefix
    hit, and only the tail is computed again.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.common.block_keys import chain_keys
from services.engine.engine import BaseEngine
from services.worker.handoff import Tracked


@dataclass(frozen=True, slots=True)
class Checkpoint:
    request_id: str
    sink: str
    next_index: int                 # output position after the last token it produced here
    keys: list[bytes]
    data: bytes                     # the blocks' KV, `keys` order, KVLayout.bytes_per_block each

    @property
    def num_blocks(self) -> int:
        return len(self.keys)


def take_checkpoints(engine: BaseEngine, tracked: dict[str, Tracked], read_kv: bool) -> list[Checkpoint]:
    """Every tracked request's full computed blocks (read now when `read_kv`, else only counted), then
    drop the request here."""
    bs = engine.layout.block_size
    checkpoints = []
    for rid, req in list(tracked.items()):
        seq = engine.seqs.get(rid)
        if seq is None:
            continue
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_ids))
        keys = chain_keys(seq.token_ids[:num_full * bs], bs) if read_kv else []
        data = engine.read_block_bytes(seq.block_ids[:num_full]) if read_kv else b""
        checkpoints.append(Checkpoint(rid, req.sink, req.output_offset + seq.num_output_tokens, keys, data))
        engine.abort(rid)
    return checkpoints
