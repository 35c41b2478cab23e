"""Wire → engine for a worker's requests: validation messages and `SamplingParams`."""
from __future__ import annotations

from services.engine.sampling import SamplingParams
from services.gen.ferry.v1 import common_pb2, worker_pb2


def validate_prefill(request: worker_pb2.PrefillRequest, role: int) -> str | None:
    """None if the request can run here, else what to fix."""
    if not request.request_id:
        return "request_id is empty"
    if not request.prompt_token_ids:
        return "prompt_token_ids is empty: send at least one token"
    if not request.sink_address:
        return "sink_address is empty: say where the tokens go"
    if role == common_pb2.ROLE_DECODE:
        return "this is a decode worker: send Prefill to a prefill or colocated worker"
    if role == common_pb2.ROLE_PREFILL and not request.decode_address:
        return "this is a prefill-only worker: set decode_address"
    return None


def sampling_params(options: common_pb2.SamplingOptions) -> SamplingParams:
    return SamplingParams(
        max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p or 1.0,
        top_k=options.top_k or None, seed=options.seed if options.HasField("seed") else None,
        stop=tuple(options.stop), stop_token_ids=tuple(options.stop_token_ids), ignore_eos=options.ignore_eos)
