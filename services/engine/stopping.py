"""When a sequence stops: EOS, stop token ids, stop strings, max_tokens, or the model's context."""
from __future__ import annotations

from collections.abc import Callable

from services.engine.sequence import FinishReason, Sequence

Detokenize = Callable[[list[int]], str]


def check_stop(seq: Sequence, eos_token_ids: tuple[int, ...], max_model_len: int,
               detokenize: Detokenize | None) -> tuple[FinishReason, str | int | None] | None:
    """Why `seq` must stop after its newest token, or None to continue."""
    p = seq.params
    last = seq.token_ids[-1]
    if not p.ignore_eos and last in eos_token_ids:
        return FinishReason.STOP, last
    if last in p.stop_token_ids:
        return FinishReason.STOP, last
    if p.stop and detokenize is not None:
        # A stop string ends within the newest token's text; a tail of tokens as long as the
        # longest stop string in UTF-8 bytes (each token is at least one byte) is enough to see it.
        window = max(len(s.encode()) for s in p.stop) + 1
        tail = detokenize(seq.output_token_ids[-window:])
        for s in p.stop:
            if s in tail:
                return FinishReason.STOP, s
    if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string (OpenAI semantics: the stop string is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
