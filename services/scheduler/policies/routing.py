"""The routing framework: per phase, filters → weighted scorers → picker; `decide` chooses the phases.

    instances ─▶ role admits phase ─▶ filter ─▶ filter ─▶ … ─▶ Σ wᵢ·clamp(scoreᵢ) / Σ wᵢ ─▶ picker
                                       (each may empty the list: NoRoute names the filter that did)

`decide` runs the pipeline for prefill (PREFILL or BOTH instances) and for decode (DECODE or BOTH):

- some candidate on either side is a dedicated PREFILL/DECODE instance → disaggregated: the prefill
  profile picks the prefill instance and the decode profile the decode instance, independently;
- every candidate is a BOTH instance → colocated: the colocated profile picks one BOTH instance that
  does both phases (no KV transfer).

Plugins are small frozen objects that read the `RouteContext`; they never mutate and never read the
clock (time is `ctx.snapshot.now`). Ties go to the smallest instance id, so a decision is a function
of its inputs alone.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.cluster import ClusterSnapshot, InstanceState, NoRoute, Role, Route, RouteRequest


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"   # one BOTH instance prefills and decodes

    def admits(self, role: Role) -> bool:
        if self is Phase.PREFILL:
            return role.can_prefill
        if self is Phase.DECODE:
            return role.can_decode
        return role is Role.BOTH


DECODE_HEADROOM_TOKENS = 128


@dataclass(frozen=True, slots=True)
class RouteContext:
    """Everything a plugin may read for one request and one phase."""
    snapshot: ClusterSnapshot
    request: RouteRequest
    phase: Phase
    prefix_depths: Mapping[str, int]   # instance id -> leading prompt blocks recently prefilled there

    @property
    def num_tokens(self) -> int:
        """Tokens the chosen instance must have room for now: the prompt for prefill; for decode also
        the first DECODE_HEADROOM_TOKENS of output. Not all of max_tokens: a chat request's default
        max_tokens fills the context, and output grows a block at a time (the engine preempts when
        its pool runs out), so reserving it all would refuse work a busy worker can take."""
        r = self.request
        if self.phase is Phase.PREFILL:
            return r.num_prompt_tokens
        return r.num_prompt_tokens + min(r.max_tokens, DECODE_HEADROOM_TOKENS)


class PrefixLookup(Protocol):
    """Read-only view of the prefix index (prefix_index.PrefixIndex)."""
    def match(self, keys: Sequence[bytes]) -> Mapping[str, int]: ...


class Filter(Protocol):
    name: str

    def keep(self, ctx: RouteContext, instance: InstanceState) -> bool: ...

    def why(self, ctx: RouteContext) -> str:
        """Completes "none …" for the NoRoute reason when this filter leaves no candidate."""
        ...


class Scorer(Protocol):
    name: str

    def score(self, ctx: RouteContext, instance: InstanceState) -> float:
        """Higher is better; the framework clamps it to [0, 1]."""
        ...


class Picker(Protocol):
    def __call__(self, scored: Sequence[tuple[float, InstanceState]]) -> InstanceState: ...


def pick_highest(scored: Sequence[tuple[float, InstanceState]]) -> InstanceState:
    """The highest total score; ties go to the smallest instance id."""
    return min(scored, key=lambda s: (-s[0], s[1].instance_id))[1]


@dataclass(frozen=True, slots=True)
class Weighted:
    scorer: Scorer
    weight: float


@dataclass(frozen=True, slots=True)
class RoutingProfile:
    """One phase's pipeline."""
    filters: tuple[Filter, ...]
    scorers: tuple[Weighted, ...]
    picker: Picker = pick_highest

    def __post_init__(self) -> None:
        for w in self.scorers:
            if w.weight < 0:
                raise ValueError(f"scorer {w.scorer.name} has weight {w.weight}; weights must be >= 0")


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """The three profiles `decide` may run."""
    prefill: RoutingProfile
    decode: RoutingProfile
    colocated: RoutingProfile


def clamp01(x: float) -> float:
    return 0.0 if not x > 0.0 else min(1.0, x)   # NaN -> 0


def total_score(ctx: RouteContext, profile: RoutingProfile, instance: InstanceState) -> float:
    """Weighted mean of the clamped scores, in [0, 1]."""
    weight_sum = sum(w.weight for w in profile.scorers)
    if weight_sum <= 0:
        return 0.0
    return sum(w.weight * clamp01(w.scorer.score(ctx, instance)) for w in profile.scorers) / weight_sum


def candidates(ctx: RouteContext, profile: RoutingProfile) -> tuple[InstanceState, ...] | NoRoute:
    """Instances whose role admits the phase and that pass every filter, or why there are none."""
    phase, model = ctx.phase.value, ctx.request.model
    left = tuple(i for i in ctx.snapshot.instances if ctx.phase.admits(i.spec.role))
    if not left:
        roles = {Phase.PREFILL: "PREFILL or BOTH", Phase.DECODE: "DECODE or BOTH"}.get(ctx.phase, "BOTH")
        return NoRoute(f"no {phase} instance for model {model!r}: no instance with role {roles} "
                       "is registered")
    for f in profile.filters:
        kept = tuple(i for i in left if f.keep(ctx, i))
        if not kept:
            return NoRoute(f"no {phase} instance for model {model!r}: of {len(left)} candidate(s), "
                           f"none {f.why(ctx)} (filter {f.name})")
        left = kept
    return left


def pick(ctx: RouteContext, profile: RoutingProfile,
         among: Sequence[InstanceState]) -> InstanceState:
    return profile.picker([(total_score(ctx, profile, i), i) for i in among])


def decide(snapshot: ClusterSnapshot, request: RouteRequest, policy: RoutingPolicy,
           prefix_index: PrefixLookup) -> Route | NoRoute:
    """Where to prefill and where to decode `request`, or why nowhere."""
    depths = prefix_index.match(request.block_keys) if request.block_keys else {}
    prefill_ctx = RouteContext(snapshot, request, Phase.PREFILL, depths)
    decode_ctx = RouteContext(snapshot, request, Phase.DECODE, depths)
    prefill_ids = candidates(prefill_ctx, policy.prefill)
    if isinstance(prefill_ids, NoRoute):
        return prefill_ids
    decode_ids = candidates(decode_ctx, policy.decode)
    if isinstance(decode_ids, NoRoute):
        return decode_ids
    if all(i.spec.role is Role.BOTH for i in prefill_ids + decode_ids):
        ctx = RouteContext(snapshot, request, Phase.COLOCATED, depths)
        both = candidates(ctx, policy.colocated)
        if isinstance(both, NoRoute):
            return both
        chosen = pick(ctx, policy.colocated, both).instance_id
        return Route(prefill_id=chosen, decode_id=chosen)
    return Route(prefill_id=pick(prefill_ctx, policy.prefill, prefill_ids).instance_id,
                 decode_id=pick(decode_ctx, policy.decode, decode_ids).instance_id)
