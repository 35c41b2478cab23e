"""What the prefill role does on the engine thread after each step (pure engine bookkeeping).

For a request whose KV goes to a decode worker:

    prefill chunk 1 done   -> stage [0, k1)       full blocks so far (never the request's last block)
    prefill chunk 2 done   -> stage [k1, k2)
    first token sampled    -> final stage [k2, n)  (+ the request's state), then abort it here:
                              its full blocks stay in this worker's prefix cache

Holding back the last block keeps mid-prefill stages non-final, so the decode worker resumes the
request only after the final stage, when the whole prompt's KV is there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.engine import BaseEngine, RequestOutput
from services.engine.kv_transfer import KVPayload


@dataclass(eq=False)
class Tracked:
    """A request this worker runs, as the engine thread sees it."""
    request_id: str
    sink: str
    hand_off: bool                       # the KV goes to a decode worker after the first token
    priority: int = 0                    # common_pb2.Priority
    num_store_blocks: int = 0            # leading prompt blocks the kvstore already has
    sent_blocks: int = 0                 # blocks already staged to the decode worker
    output_offset: int = 0               # output position of its first token here (a resumed request)


@dataclass
class StepResult:
    """Everything one step produced, for the event loop to send."""
    outputs: list[tuple[Tracked, RequestOutput]] = field(default_factory=list)
    stages: list[tuple[Tracked, KVPayload]] = field(default_factory=list)
    store_writes: list[tuple[list[bytes], bytes]] = field(default_factory=list)   # (keys, block bytes)


def after_step(engine: BaseEngine, outputs: list[RequestOutput], tracked: dict[str, Tracked],
               write_store: bool) -> StepResult:
    result = StepResult()
    for out in outputs:
        req = tracked.get(out.request_id)
        if req is None:
            continue
        if out.num_output_tokens == 1 and write_store and not out.finished:
            result.store_writes.append(_prompt_blocks(engine, req))
        if req.hand_off and not out.finished:
            payload = engine.export_kv(req.request_id, slice(req.sent_blocks, None))
            req.sent_blocks += payload.num_blocks
            engine.abort(req.request_id)
            result.stages.append((req, payload))
        result.outputs.append((req, out))
    for req in tracked.values():
        seq = engine.seqs.get(req.request_id)
        if req.hand_off and seq is not None and seq.is_prefilling:
            bs = engine.layout.block_size
            ready = min(seq.num_computed_tokens // bs, -(-seq.num_computed_tokens // bs) - 1)
            if ready > req.sent_blocks:
                payload = engine.export_kv(req.request_id, slice(req.sent_blocks, ready))
                req.sent_blocks = ready
                result.stages.append((req, payload))
    return result


def _prompt_blocks(engine: BaseEngine, req: Tracked) -> tuple[list[bytes], bytes]:
    """Keys and KV of the prompt's full blocks the kvstore lacks (read before the blocks can change)."""
    seq = engine.seqs[req.request_id]
    num_full = seq.num_prompt_tokens // engine.layout.block_size
    first = min(req.num_store_blocks, num_full)
    keys = seq.block_keys[first:num_full]
    return keys, engine.read_block_bytes(seq.block_ids[first:num_full])
