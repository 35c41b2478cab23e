"""The routing framework: per phase, filters → weighted scorers → picker; `decide` chooses the phases.

    instances ─▶ role admits phase ─▶ filter ─▶ filter ─▶ … ─▶ Σ wᵢ·clamp(scoreᵢ) / Σ wᵢ ─▶ picker
                                       (each may empty the list: NoRoute names the filter that did)

`decide` runs the pipeline for prefill (PREFILL or BOTH instances) and for decode (DECODE or BOTH):

- some candidate on either side is a dedicated PREFILL/DECODE instance → disaggregated: the prefill
  profile picks the prefill instance and the decode profile the decode instance, independently;
- every candidate is a BOTH instance → colocated: the colocated profile picks one BOTH instance that
  does both phases (no KV transfer).

Plugins are small frozen objects that read the `RouteContext`; they never mutate and never read the
clock (time is `ctx.snapshot.now`). They work on columns (`ctx.table`, one row per instance): a filter
returns a boolean mask, a scorer an array of scores, so one decision over 1,000 instances is a few
dozen numpy expressions rather than thousands of Python calls. Ties go to the smallest instance id,
so a decision is a function of its inputs alone (`ordinal`, the caller's count of Route calls, is
one of them: the round-robin picker turns on it).
"""
from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.common.cluster import ClusterSnapshot, NoRoute, Role, Route, RouteRequest
from services.scheduler.policies.instance_table import InstanceTable, TableCache
from services.scheduler.prefix_index import KVSTORE_ID


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

    def admitted(self, table: InstanceTable) -> np.ndarray:
        """`admits` as a mask over the table's rows."""
        if self is Phase.PREFILL:
            return table.can_prefill
        if self is Phase.DECODE:
            return table.can_decode
        return table.is_both


DECODE_HEADROOM_TOKENS = 128


@dataclass(frozen=True, slots=True)
class RouteContext:
    """Everything a plugin may read for one request and one phase. `table` holds the snapshot's
    instances as columns; it is built from the snapshot when not given (tests, one-off calls)."""
    snapshot: ClusterSnapshot
    request: RouteRequest
    phase: Phase
    prefix_depths: Mapping[str, int]   # instance id (or KVSTORE_ID) -> leading prompt blocks held there
    ordinal: int = 0                   # how many Route calls the caller made before this one
    table: InstanceTable = None        # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        if self.table is None:
            object.__setattr__(self, "table", InstanceTable.build(self.snapshot.instances))

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


class PrefixRecorder(PrefixLookup, Protocol):
    """The prefix index as `decide_many` uses it: it also records each route."""
    def record(self, keys: Sequence[bytes], instance_id: str) -> None: ...


class Filter(Protocol):
    name: str

    def keep(self, ctx: RouteContext) -> np.ndarray:
        """A boolean per row of ctx.table: may this instance take the request?"""
        ...

    def why(self, ctx: RouteContext) -> str:
        """Completes "none …" for the NoRoute reason when this filter leaves no candidate."""
        ...


class Scorer(Protocol):
    name: str

    def score(self, ctx: RouteContext) -> np.ndarray:
        """A score per row of ctx.table, higher is better; the framework clamps it to [0, 1]."""
        ...


class Picker(Protocol):
    name: str

    def pick(self, ctx: RouteContext, rows: np.ndarray, scores: np.ndarray) -> int:
        """One of `rows` (candidate row numbers of ctx.table), given their total `scores`."""
        ...


@dataclass(frozen=True, slots=True)
class PickHighest:
    """The highest total score; ties go to the smallest instance id."""
    name = "highest"

    def pick(self, ctx: RouteContext, rows: np.ndarray, scores: np.ndarray) -> int:
        best = np.flatnonzero(scores == scores.max())
        if len(best) == 1:
            return int(rows[best[0]])
        tied = rows[best]
        return int(tied[np.argmin(ctx.table.id_rank[tied])])


@dataclass(frozen=True, slots=True)
class Weighted:
    scorer: Scorer
    weight: float


@dataclass(frozen=True, slots=True)
class RoutingProfile:
    """One phase's pipeline."""
    filters: tuple[Filter, ...]
    scorers: tuple[Weighted, ...]
    picker: Picker = PickHighest()
    weight_sum: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        for w in self.scorers:
            if not w.weight >= 0:
                raise ValueError(f"scorer {w.scorer.name} has weight {w.weight}; weights must be >= 0")
        object.__setattr__(self, "weight_sum", float(sum(w.weight for w in self.scorers)))


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """The three profiles `decide` may run. `tables` is a memo of the last snapshot's columns."""
    prefill: RoutingProfile
    decode: RoutingProfile
    colocated: RoutingProfile
    tables: TableCache = field(default_factory=TableCache, compare=False, repr=False)
    compiled: dict = field(default_factory=dict, compare=False, repr=False)   # compiled.py's kernel arguments


def clamp01(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0.0, np.minimum(x, 1.0), 0.0)   # NaN -> 0


def total_scores(ctx: RouteContext, profile: RoutingProfile, rows: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of the clamped scores, in [0, 1], for `rows` (default: every row)."""
    num_rows = len(ctx.table) if rows is None else len(rows)
    total: float | np.ndarray = 0.0
    for w in profile.scorers:
        if w.weight > 0:
            scores = w.scorer.score(ctx)          # an array over all rows, or one number for all
            if rows is not None and np.ndim(scores):
                scores = scores[rows]
            total = total + w.weight * clamp01(scores)
    if profile.weight_sum > 0:
        total = total / profile.weight_sum
    return np.broadcast_to(np.asarray(total, dtype=np.float64), (num_rows,))


def candidates(ctx: RouteContext, profile: RoutingProfile) -> np.ndarray | NoRoute:
    """Row numbers of the instances whose role admits the phase and that pass every filter, or why
    there are none."""
    phase, model = ctx.phase.value, ctx.request.model
    left = ctx.phase.admitted(ctx.table)
    if not left.any():
        roles = {Phase.PREFILL: "PREFILL or BOTH", Phase.DECODE: "DECODE or BOTH"}.get(ctx.phase, "BOTH")
        return NoRoute(f"no {phase} instance for model {model!r}: no instance with role {roles} "
                       "is registered")
    for f in profile.filters:
        kept = left & f.keep(ctx)
        if not kept.any():
            return NoRoute(f"no {phase} instance for model {model!r}: of {np.count_nonzero(left)} "
                           f"candidate(s), none {f.why(ctx)} (filter {f.name})")
        left = kept
    return np.flatnonzero(left)


def pick(ctx: RouteContext, profile: RoutingProfile, rows: np.ndarray) -> str:
    """The chosen instance's id."""
    return ctx.table.ids[profile.picker.pick(ctx, rows, total_scores(ctx, profile, rows))]


def decide(snapshot: ClusterSnapshot, request: RouteRequest, policy: RoutingPolicy,
           prefix_index: PrefixLookup, *, ordinal: int = 0) -> Route | NoRoute:
    """Where to prefill and where to decode `request`, or why nowhere. Reads only: the caller applies
    the decision (Registry.reserve, record_route)."""
    from services.scheduler.policies.compiled import route_requests
    table = policy.tables.table_for(snapshot)
    return route_requests(snapshot, table, [request], policy, prefix_index, ordinal, reserve=False)[0]


def decide_many(snapshot: ClusterSnapshot, requests: Sequence[RouteRequest], policy: RoutingPolicy,
                prefix_index: PrefixRecorder, *, first_ordinal: int = 0,
                table: InstanceTable | None = None) -> list[Route | NoRoute]:
    """Route `requests` in order, as the server routes one Route call after another: each request sees
    the reservations (`reserve_route`) and prefix records (`record_route`) of the ones before it, so
    the result equals `decide` + apply per request, without rebuilding the table in between.

    `table`: the instances as columns, reserved in place (the simulator keeps one per heartbeat and
    routes every arrival until the next against it); default: a private copy of the snapshot's. The
    prefix index is updated, as the server's is. Runs the compiled pipeline (compiled.py).
    """
    from services.scheduler.policies.compiled import route_requests
    table = table if table is not None else policy.tables.table_for(snapshot).copy()
    return route_requests(snapshot, table, list(requests), policy, prefix_index, first_ordinal)


def decide_reference(snapshot: ClusterSnapshot, request: RouteRequest, policy: RoutingPolicy,
                     prefix_index: PrefixLookup, *, ordinal: int = 0) -> Route | NoRoute:
    """`decide` through the numpy pipeline above, the readable reference the compiled one must equal."""
    return _decide(snapshot, policy.tables.table_for(snapshot), request, policy, prefix_index, ordinal)


def why_no_route(snapshot: ClusterSnapshot, table: InstanceTable, request: RouteRequest, policy: RoutingPolicy,
                 prefix_index: PrefixLookup, ordinal: int) -> NoRoute:
    """The NoRoute the numpy pipeline gives a request the compiled one found no route for (its reason
    names the filter that emptied the list). Anything else means the two disagree: a bug."""
    decision = _decide(snapshot, table, request, policy, prefix_index, ordinal)
    if not isinstance(decision, NoRoute):
        raise RuntimeError(f"compiled routing found no route for {request.request_id} but the reference "  # noqa: TRY004
                           f"pipeline routes it to {decision}")
    return decision


def reserve_route(table: InstanceTable, request: RouteRequest, route: Route) -> None:
    """Count a routed request against its instances' rows: its whole length on the decode instance, its
    prompt on a separate prefill instance (the server makes the same change through Registry.reserve)."""
    decode_row = table.row_of[route.decode_id]
    table.reserve(decode_row, _blocks(request.num_total_tokens, int(table.block_size[decode_row])))
    if not route.is_colocated:
        prefill_row = table.row_of[route.prefill_id]
        table.reserve(prefill_row, _blocks(request.num_prompt_tokens, int(table.block_size[prefill_row])))


def record_route(prefix_index: PrefixRecorder, request: RouteRequest, route: Route) -> None:
    """Remember the prompt's blocks on the prefill instance and in the kvstore (the prefill worker
    writes them there), for later requests' prefix affinity."""
    if request.block_keys:
        prefix_index.record(request.block_keys, route.prefill_id)
        prefix_index.record(request.block_keys, KVSTORE_ID)


def _blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size) if block_size > 0 else 0


def _decide(snapshot: ClusterSnapshot, table: InstanceTable, request: RouteRequest, policy: RoutingPolicy,
            prefix_index: PrefixLookup, ordinal: int) -> Route | NoRoute:
    depths = prefix_index.match(request.block_keys) if request.block_keys else {}
    prefill_ctx = RouteContext(snapshot, request, Phase.PREFILL, depths, ordinal, table)
    decode_ctx = RouteContext(snapshot, request, Phase.DECODE, depths, ordinal, table)
    prefill_rows = candidates(prefill_ctx, policy.prefill)
    if isinstance(prefill_rows, NoRoute):
        return prefill_rows
    decode_rows = candidates(decode_ctx, policy.decode)
    if isinstance(decode_rows, NoRoute):
        return decode_rows
    if table.is_both[prefill_rows].all() and table.is_both[decode_rows].all():
        ctx = RouteContext(snapshot, request, Phase.COLOCATED, depths, ordinal, table)
        both = candidates(ctx, policy.colocated)
        if isinstance(both, NoRoute):
            return both
        chosen = pick(ctx, policy.colocated, both)
        return Route(prefill_id=chosen, decode_id=chosen)
    return Route(prefill_id=pick(prefill_ctx, policy.prefill, prefill_rows),
                 decode_id=pick(decode_ctx, policy.decode, decode_rows))
