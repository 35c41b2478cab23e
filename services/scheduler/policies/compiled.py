"""The routing pipeline compiled (numba): the same filters, scorers, pickers and reservations as the
numpy framework in routing.py, for a whole stream of requests in one call.

Why: at 1,000 instances the numpy pipeline costs ~200 µs a decision, nearly all of it per-call
overhead (a few dozen numpy expressions, each paying microseconds to look at 1,000 rows). The
simulator routes millions of requests, so `decide_many` runs this kernel instead: one pass over the
rows per phase, fused, with no allocation per request.

Exactness: every formula below is the scalar form of a plugin's numpy expression, in the same order of
floating-point operations, so the two agree to the bit (tests/scheduler/test_decide_many.py compares
them on random clusters, policies and request streams). When a request gets no route, the kernel stops
and `routing.py` asks the numpy framework for the reason text, so NoRoute messages have one source.

    profile  ->  filter codes, scorer codes + weights + 4 parameters each, picker code  (compile_profile)
    per request, per phase: for each admitted row: first failing filter, else weighted clamped score
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from services.common.cluster import Priority
from services.scheduler.policies import filters, pickers, routing, scorers, ttft

FILTER_CODES = {filters.ServesModel: 0, filters.Healthy: 1, filters.NotDraining: 2, filters.FitsContext: 3,
                filters.HasKvRoom: 4}
SCORER_CODES = {scorers.PrefixAffinity: 0, scorers.FreeBlocks: 1, scorers.ShortQueue: 2, scorers.Freeness: 3,
                ttft.PredictedTtft: 4}
PICKER_CODES = {routing.PickHighest: 0, pickers.RoundRobin: 1}
PREFILL, DECODE, COLOCATED = 0, 1, 2
ORDERED_BATCH = 16      # requests in one call from which the bound-ordered scan (and its upkeep) is used


@dataclass(frozen=True)
class CompiledProfile:
    filters: np.ndarray     # int64 codes, in order
    scorers: np.ndarray     # int64 codes of the scorers with weight > 0, in order
    weights: np.ndarray     # float64
    params: np.ndarray      # float64 (len(scorers), 4)
    picker: int
    weight_sum: float


def compile_profile(profile: routing.RoutingProfile) -> CompiledProfile:
    codes, weights, params = [], [], []
    for w in profile.scorers:
        if w.weight > 0:
            s = w.scorer
            codes.append(_code(SCORER_CODES, s, "scorer"))
            weights.append(w.weight)
            values = {0: (getattr(s, "kvstore_credit", 0.0),), 3: (getattr(s, "half_score_blocks", 0.0),),
                      4: (getattr(s, "slo_s", 0.0), getattr(s, "prefill_tokens_per_s", 0.0),
                          getattr(s, "transfer_bytes_per_s", 0.0), getattr(s, "bytes_per_block", 0.0))}
            params.append((*values.get(codes[-1], ()), 0.0, 0.0, 0.0, 0.0)[:4])
    return CompiledProfile(np.array([_code(FILTER_CODES, f, "filter") for f in profile.filters], np.int64),
                           np.array(codes, np.int64), np.array(weights, np.float64),
                           np.array(params, np.float64).reshape(len(codes), 4),
                           _code(PICKER_CODES, profile.picker, "picker"), float(profile.weight_sum))


def _code(table: dict, plugin, kind: str) -> int:
    code = table.get(type(plugin))
    if code is None:
        raise ValueError(f"{kind} {type(plugin).__name__} has no compiled form; add it to policies/compiled.py")
    return code


@njit(cache=True, inline="always")
def _blocks(num_tokens, block_size):
    return -(-num_tokens // block_size) if block_size > 0 else 0


@njit(cache=True, inline="always")
def _clamp01(x):
    return min(x, 1.0) if x > 0.0 else 0.0


@njit(cache=True)
def _phase(phase, profile, order, bound, early, same, cols, depth, store_depth, num_keys, model, prompt, max_tokens,
           high, now, timeout, ordinal, buffer):
    """One phase of one request: (chosen row, or -1 when no row passes every filter; whether some
    candidate is not a BOTH instance). `order`: the rows the phase admits, in falling order of `bound`
    (an upper bound of each row's total score); with `early`, the scan stops at the first row whose
    bound is below the best total found, which is exact because no later row can win or tie."""
    fcodes, scodes, weights, params, picker, weight_sum = profile
    (is_both, model_code, last_heartbeat, draining, block_size, max_model_len, num_blocks, free, running, queued,
     waiting_tokens, queued_blocks, headroom, id_rank) = cols
    num_tokens = prompt if phase == PREFILL else prompt + min(max_tokens, 128)
    best, best_total, count, not_both = -1, 0.0, 0, False
    for i in range(len(order)):
        r = order[i]
        if early and best >= 0 and (bound[r] < best_total or (bound[r] == best_total and id_rank[r] > id_rank[best])):
            break     # rows come by falling bound, then rising id: none later can win, nor tie with a smaller id
        if early and same[i]:
            continue  # the same inputs as the row before it, whose id is smaller: it cannot beat that row
        passed = True
        for f in fcodes:
            if f == 0:
                passed = model_code[r] == model
            elif f == 1:
                passed = max(0.0, now - last_heartbeat[r]) <= timeout
            elif f == 2:
                passed = not draining[r]
            elif f == 3:
                passed = max_model_len[r] >= num_tokens
            else:
                room = free[r] if high else free[r] - headroom[r]
                passed = room >= _blocks(num_tokens, block_size[r]) and num_blocks[r] > 0
            if not passed:
                break
        if not passed:
            continue
        buffer[count] = r
        count += 1
        if not is_both[r]:
            not_both = True
        if picker == 1:
            continue
        total = 0.0
        for k in range(len(scodes)):
            s = scodes[k]
            if s == 0:
                if num_keys == 0:
                    score = 0.0
                else:
                    own = depth[r]
                    score = (own + params[k, 0] * max(0.0, store_depth - own)) / num_keys
            elif s == 1:
                score = free[r] / max(num_blocks[r], 1) if num_blocks[r] > 0 else 0.0
            elif s == 2:
                score = 1.0 / (1 + queued[r])
            elif s == 3:
                hold = 0 if high else headroom[r]
                room = (free[r] - queued_blocks[r] - hold - _blocks(num_tokens, block_size[r])) / max(1, running[r])
                room = 0.0 if draining[r] else max(room, 0.0)
                score = room / (room + params[k, 0])
            else:
                seconds = waiting_tokens[r] / params[k, 1]
                if phase != DECODE:
                    cached = max(depth[r], float(store_depth))
                    uncached = max(0.0, prompt - cached * block_size[r])
                    seconds = seconds + uncached / params[k, 1]
                if phase != COLOCATED:
                    seconds = seconds + _blocks(prompt, block_size[r]) * params[k, 3] / params[k, 2]
                score = 1.0 - seconds / params[k, 0]
            total = total + weights[k] * _clamp01(score)
        if weight_sum > 0:
            total = total / weight_sum
        if best < 0 or total > best_total or (total == best_total and id_rank[r] < id_rank[best]):
            best, best_total = r, total
    if count == 0:
        return -1, not_both
    if picker == 1:                                 # round robin: the (ordinal mod n)-th in id order
        chosen = buffer[:count]
        order = np.argsort(id_rank[chosen])
        return chosen[order[ordinal % count]], not_both
    return best, not_both


@njit(cache=True)
def _bound(scodes, weights, params, weight_sum, num_keys, r, draining, free, num_blocks, running, queued,
           waiting_tokens, queued_blocks):
    """An upper bound of row r's total score for any request: each scorer at its most favourable
    request (no tokens to place, no headroom held back, nothing to prefill or transfer). Scores only
    fall with a request's size, clamping and the weighted sum keep the order, and IEEE rounding is
    monotone, so the bound holds to the bit."""
    total = 0.0
    for k in range(len(scodes)):
        s = scodes[k]
        if s == 0:
            score = 1.0 if num_keys > 0 else 0.0
        elif s == 1:
            score = free[r] / max(num_blocks[r], 1) if num_blocks[r] > 0 else 0.0
        elif s == 2:
            score = 1.0 / (1 + queued[r])
        elif s == 3:
            room = (free[r] - queued_blocks[r]) / max(1, running[r])
            room = 0.0 if draining[r] else max(room, 0.0)
            score = room / (room + params[k, 0])
        else:
            score = 1.0 - (waiting_tokens[r] / params[k, 1]) / params[k, 0]
        total = total + weights[k] * _clamp01(score)
    if weight_sum > 0:
        total = total / weight_sum
    return total


@njit(cache=True)
def _sort_phase(admit, ph, scodes, weights, params, weight_sum, num_keys, draining, free, num_blocks, running, queued,
                waiting_tokens, queued_blocks, id_rank, order, pos, bound):
    """Fill order[ph] with the admitted rows by falling bound, then rising id; returns how many."""
    rows = np.flatnonzero(admit)
    for r in rows:
        bound[ph, r] = _bound(scodes, weights, params, weight_sum, num_keys, r, draining, free, num_blocks, running,
                              queued, waiting_tokens, queued_blocks)
    by_id = rows[np.argsort(id_rank[rows], kind="mergesort")]
    sorted_rows = by_id[np.argsort(-bound[ph, by_id], kind="mergesort")]     # stable: ties stay in id order
    for i in range(len(sorted_rows)):
        order[ph, i] = sorted_rows[i]
        pos[ph, sorted_rows[i]] = i
    return len(sorted_rows)


@njit(cache=True)
def _sink(order, pos, bound, same, id_rank, ph, n, r, new_bound):
    """Row r's bound fell (a reservation): move it down its phase's order to keep it sorted (the rows it
    passes keep their `same` flags: their neighbours move with them). Returns (old, new) position."""
    bound[ph, r] = new_bound
    i = old = pos[ph, r]
    while i + 1 < n and (bound[ph, order[ph, i + 1]] > new_bound or (
            bound[ph, order[ph, i + 1]] == new_bound and id_rank[order[ph, i + 1]] < id_rank[r])):
        nxt = order[ph, i + 1]
        order[ph, i] = nxt
        same[ph, i] = same[ph, i + 1]
        pos[ph, nxt] = i
        i += 1
    order[ph, i] = r
    pos[ph, r] = i
    return old, i


@njit(cache=True)
def _same(a, b, is_both, model_code, last_heartbeat, draining, block_size, max_model_len, num_blocks, free, running,
          queued, waiting_tokens, queued_blocks, headroom, depth):
    """Rows a and b give every request the same filter results and scores (every input is equal)."""
    return (is_both[a] == is_both[b] and model_code[a] == model_code[b] and last_heartbeat[a] == last_heartbeat[b]
            and draining[a] == draining[b] and block_size[a] == block_size[b]
            and max_model_len[a] == max_model_len[b] and num_blocks[a] == num_blocks[b] and free[a] == free[b]
            and running[a] == running[b] and queued[a] == queued[b] and waiting_tokens[a] == waiting_tokens[b]
            and queued_blocks[a] == queued_blocks[b] and headroom[a] == headroom[b] and depth[a] == depth[b])


@njit(cache=True)
def _mark(order, same, ph, n, i, is_both, model_code, last_heartbeat, draining, block_size, max_model_len, num_blocks,
          free, running, queued, waiting_tokens, queued_blocks, headroom, depth):
    if 0 < i < n:
        same[ph, i] = _same(order[ph, i - 1], order[ph, i], is_both, model_code, last_heartbeat, draining, block_size,
                            max_model_len, num_blocks, free, running, queued, waiting_tokens, queued_blocks,
                            headroom, depth)
    elif i == 0:
        same[ph, 0] = False


@njit(cache=True)
def route_stream(start, prompts, max_tokens, highs, models, num_keys, depth, store_depth, ordinal0, reserve,
                 pf, ps, pw, pp, pk, pws, df, ds, dw, dp, dk, dws, cf, cs, cw, cp, ck, cws,
                 can_prefill, can_decode, is_both, model_code, last_heartbeat, draining, block_size, max_model_len,
                 num_blocks, free, running, queued, waiting_tokens, queued_blocks, headroom, id_rank, now, timeout,
                 out_prefill, out_decode):
    """Route requests start.. in order (reserving each route in the columns when `reserve`); returns the
    index of the first request with no route (the caller asks the numpy framework why), or len."""
    n_rows = len(can_prefill)
    buffer = np.empty(n_rows, np.int64)
    order = np.empty((3, n_rows), np.int64)
    pos = np.zeros((3, n_rows), np.int64)
    bound = np.zeros((3, n_rows))
    same = np.zeros((3, n_rows), np.bool_)
    admits = (can_prefill, can_decode, is_both)
    scorer_sets = ((ps, pw, pp, pws), (ds, dw, dp, dws), (cs, cw, cp, cws))
    counts = np.zeros(3, np.int64)
    early = np.zeros(3, np.bool_)
    ordered = len(prompts) - start >= ORDERED_BATCH     # sorting pays off over a stream, not for one request
    for ph in range(3):
        if not ordered:
            rows = np.flatnonzero(admits[ph])
            counts[ph] = len(rows)
            order[ph, :len(rows)] = rows
            continue
        sc, w, pa, ws = scorer_sets[ph]
        counts[ph] = _sort_phase(admits[ph], ph, sc, w, pa, ws, num_keys, draining, free, num_blocks, running,
                                 queued, waiting_tokens, queued_blocks, id_rank, order, pos, bound)
        rows = order[ph, :counts[ph]]
        for i in range(counts[ph]):
            _mark(order, same, ph, counts[ph], i, is_both, model_code, last_heartbeat, draining, block_size,
                  max_model_len, num_blocks, free, running, queued, waiting_tokens, queued_blocks, headroom, depth)
        # a phase whose admitted rows mix BOTH and others needs the full candidate set (colocated or not)
        homogeneous = ph == COLOCATED or is_both[rows].all() or not is_both[rows].any()
        early[ph] = homogeneous and (pk, dk, ck)[ph] == 0
    has_other = (not is_both[order[0, :counts[0]]].all(), not is_both[order[1, :counts[1]]].all())
    profiles = ((pf, ps, pw, pp, pk, pws), (df, ds, dw, dp, dk, dws), (cf, cs, cw, cp, ck, cws))
    cols = (is_both, model_code, last_heartbeat, draining, block_size, max_model_len, num_blocks, free, running, queued,
            waiting_tokens, queued_blocks, headroom, id_rank)
    chosen = np.empty(3, np.int64)
    for i in range(start, len(prompts)):
        mixed = False
        for ph in range(3):
            if ph == COLOCATED and mixed:
                break                        # some candidate is a dedicated instance: disaggregated
            row, phase_mixed = _phase(ph, profiles[ph], order[ph, :counts[ph]], bound[ph], early[ph], same[ph], cols,
                                      depth, store_depth, num_keys, models[i], prompts[i], max_tokens[i], highs[i],
                                      now, timeout, ordinal0 + i, buffer)
            if row < 0:
                return i
            chosen[ph] = row
            if ph < COLOCATED:
                mixed = mixed or (has_other[ph] if early[ph] else phase_mixed)
        p_row, d_row = (chosen[0], chosen[1]) if mixed else (chosen[2], chosen[2])
        prompt, mt = prompts[i], max_tokens[i]
        out_prefill[i], out_decode[i] = p_row, d_row
        if reserve:
            queued[d_row] += 1
            free[d_row] = max(0, free[d_row] - _blocks(prompt + mt, block_size[d_row]))
            if p_row != d_row:
                queued[p_row] += 1
                free[p_row] = max(0, free[p_row] - _blocks(prompt, block_size[p_row]))
            if not ordered:
                continue
            for r in (p_row, d_row):
                for ph in range(3):
                    if admits[ph][r]:
                        sc, w, pa, ws = scorer_sets[ph]
                        old, new = _sink(order, pos, bound, same, id_rank, ph, counts[ph], r,
                                         _bound(sc, w, pa, ws, num_keys, r, draining, free, num_blocks, running,
                                                queued, waiting_tokens, queued_blocks))
                        for j in (old, new, new + 1):     # r's old and new neighbours
                            _mark(order, same, ph, counts[ph], j, is_both, model_code, last_heartbeat, draining,
                                  block_size, max_model_len, num_blocks, free, running, queued, waiting_tokens,
                                  queued_blocks, headroom, depth)
    return len(prompts)


def _profiles(policy: routing.RoutingPolicy) -> tuple:
    """The three profiles as the kernel's arguments, compiled once per policy object."""
    args = policy.compiled.get("kernel_args")
    if args is None:
        args = ()
        for profile in (policy.prefill, policy.decode, policy.colocated):
            c = compile_profile(profile)
            args += (c.filters, c.scorers, c.weights, c.params, c.picker, c.weight_sum)
        policy.compiled["kernel_args"] = args
    return args


def _columns(table) -> tuple:
    c = table.columns
    return (c["can_prefill"], c["can_decode"], c["is_both"], c["model_code"], c["last_heartbeat"], c["draining"],
            c["block_size"], c["max_model_len"], c["num_blocks"], c["num_free_blocks"], c["num_running"],
            c["num_queued"], c["num_waiting_tokens"], c["queued_blocks"], c["high_priority_headroom"], table.id_rank)


def route_arrays(snapshot, table, policy: routing.RoutingPolicy, prompts: np.ndarray, max_tokens: np.ndarray,
                 highs: np.ndarray, models: np.ndarray, first_ordinal: int, on_no_route, *, reserve: bool = True,
                 depth: np.ndarray | None = None, store_depth: float = 0.0,
                 num_keys: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Route requests given as arrays (without block keys, or one request with its prefix `depth` per
    row): the chosen prefill and decode rows, -1 where there is no route. `on_no_route(i)` is called the
    moment request i finds none, on the table as it is then. With `reserve`, each route is reserved in
    `table` (InstanceTable.reserve) before the next request is routed."""
    n = len(prompts)
    out_prefill, out_decode = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    if depth is None:
        depth = np.zeros(len(table))
    args, cols = _profiles(policy), _columns(table)
    start = 0
    while start < n:
        stop = route_stream(start, prompts, max_tokens, highs, models, num_keys, depth, float(store_depth),
                            first_ordinal, reserve, *args, *cols, float(snapshot.now),
                            float(snapshot.heartbeat_timeout_s), out_prefill, out_decode)
        if stop < n:
            on_no_route(stop)
        start = stop + 1
    return out_prefill, out_decode


def route_requests(snapshot, table, requests, policy: routing.RoutingPolicy, prefix_index, first_ordinal: int,
                   *, reserve: bool = True) -> list:
    """`routing.decide_many`'s contract: a Route or NoRoute per request, each routed on the table as the
    ones before it left it (reservations, and prefix records when `reserve`)."""
    decisions: list = [None] * len(requests)
    k, n = 0, len(requests)
    while k < n:
        if requests[k].block_keys:               # the prefix index changes with every keyed route
            end = k + 1
        else:
            end = k
            while end < n and not requests[end].block_keys:
                end += 1
        batch = requests[k:end]
        depth, store, num_keys = None, 0.0, 0
        if batch[0].block_keys:
            depths = prefix_index.match(batch[0].block_keys)
            depth = np.zeros(len(table))
            for instance_id, blocks in depths.items():
                row = table.row_of.get(instance_id)
                if row is not None:
                    depth[row] = blocks
            store, num_keys = float(depths.get(routing.KVSTORE_ID, 0)), len(batch[0].block_keys)
        codes = table.model_codes
        prompts = np.array([r.num_prompt_tokens for r in batch], np.int64)
        max_tokens = np.array([r.max_tokens for r in batch], np.int64)
        highs = np.array([r.priority is Priority.HIGH for r in batch], np.bool_)
        models = np.array([codes.get(r.model, -1) for r in batch], np.int64)
        failures: dict[int, routing.NoRoute] = {}

        def explain(i: int, batch=batch, k=k, failures=failures) -> None:
            failures[i] = routing.why_no_route(snapshot, table, batch[i], policy, prefix_index, first_ordinal + k + i)

        prefill, decode = route_arrays(snapshot, table, policy, prompts, max_tokens, highs, models, first_ordinal + k,
                                       explain, reserve=reserve, depth=depth, store_depth=store, num_keys=num_keys)
        for i, request in enumerate(batch):
            if i in failures:
                decisions[k + i] = failures[i]
                continue
            route = routing.Route(prefill_id=table.ids[prefill[i]], decode_id=table.ids[decode[i]])
            decisions[k + i] = route
            if reserve:
                routing.record_route(prefix_index, request, route)
        k = end
    return decisions


def warm_up(policy: routing.RoutingPolicy) -> None:
    """Route one request on a two-instance table, so the kernel is compiled (or loaded from numba's
    on-disk cache) before a live Route call would wait for it."""
    from services.common.cluster import ClusterSnapshot, InstanceSpec, InstanceState, RouteRequest, WorkerLoad
    from services.scheduler.policies.instance_table import InstanceTable
    from services.scheduler.prefix_index import PrefixIndex
    states = tuple(InstanceState(InstanceSpec(f"warm-{role.value}", role, "-", "m", 16, 4096),
                                 WorkerLoad(num_blocks=64, num_free_blocks=64), 0.0)
                   for role in (routing.Role.PREFILL, routing.Role.DECODE))
    snapshot = ClusterSnapshot(0.0, states)
    request = RouteRequest("warm-up", "m", (), 16, 16)
    route_requests(snapshot, InstanceTable.build(states), [request], policy, PrefixIndex(1), 0)
