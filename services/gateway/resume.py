"""Resuming a request whose worker went away: what to run next, and when to stop trying (pure).

A resume recomputes the request from what the client already has:

    original prompt      output so far (emitted in order)      still to generate
    [p0 ........ pn-1]   [o0 ........ ok-1]                    max_tokens - k
    └──────────── the resumed prompt ───────┘                  └ its max_tokens ┘
                                             new tokens start at output index k (output_offset)

Greedy decoding gives the same tokens as an uninterrupted run (the prefill of p + o computes the same
KV the lost worker held), and when that worker checkpointed its blocks to the kvstore the prefill
finds them there (the same chained block keys). Each attempt runs under its own id, so a late Abort
or event of an earlier attempt never touches the new one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_RESUMES = 3                 # per request; one more loss is an error to the client
ROUTE_PATIENCE_S = 15.0         # how long a resume waits for the scheduler to find a worker
ROUTE_RETRY_S = (0.1, 0.2, 0.5, 1.0)    # waits between Route calls (the last one repeats)


@dataclass(frozen=True, slots=True)
class ResumePoint:
    prompt_token_ids: list[int]
    output_offset: int          # output tokens the client has; the resumed attempt's first index
    max_tokens: int             # what is left of the request's max_tokens


def resume_point(prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                 max_tokens: int) -> ResumePoint | None:
    """Where to resume, or None when nothing is left to generate (the loss came after the last token)."""
    left = max_tokens - len(output_token_ids)
    if left <= 0:
        return None
    return ResumePoint([*prompt_token_ids, *output_token_ids], len(output_token_ids), left)


def attempt_id(request_id: str, num_resumes: int) -> str:
    """The id the workers know attempt `num_resumes` by (the first attempt keeps the request's id)."""
    return request_id if num_resumes == 0 else f"{request_id}-resume{num_resumes}"


def route_waits(patience_s: float = ROUTE_PATIENCE_S) -> list[float]:
    """Pauses between Route calls while no worker can take a resumed request, summing to `patience_s`."""
    waits: list[float] = []
    while sum(waits) < patience_s:
        waits.append(min(ROUTE_RETRY_S[min(len(waits), len(ROUTE_RETRY_S) - 1)], patience_s - sum(waits)))
    return waits
