"""The cluster simulator: gateway, scheduler, prefill, decode and kvstore over a trace, in virtual time.

It steps in ticks (`spec.tick`, by default the heartbeat interval: the live scheduler only sees the
cluster through heartbeats too) and is vectorized over instances and requests; inside a tick every
time is exact to the model, not rounded to the tick. Each tick, in this order:

    spot events        the spec's and its spot market's (spot_trace.py); with `preemption: planner` a notice
                       stops routing to the instance (draining) and the migration rounds evacuate it;
                       deadlines kill instances (what they still hold re-routes and is recomputed)
    power              every power.interval_s: policies.power.decide on the instances' simulated power;
                       its caps lock their SM clocks (power.py)
    autoscaling        every autoscale interval: policies.autoscale.decide on the pools' signals; adds
                       instances or drains the least-loaded ones, which leave once empty (autoscaler.py)
    heartbeat          every heartbeat interval: the instances' load as InstanceTable columns
    migration          every migration interval: policies.preemption.plan_evacuation for each noticed
                       instance, then policies.migration.plan_migrations on the same ledger (the live code)
    routing            arrivals in [t0, t1), in order, through policies.routing.decide_many: the live
                       policy, with the same reservations between heartbeats as the live scheduler
    step times         per instance, SimProfile.seconds of its batch at its clock: its decodes plus one
                       prefill chunk (chunked prefill: colocated instances mix both, DistServe's interference)
    prefill            every instance's FIFO of prompt work, served in closed form (fifo.py); the first
                       token comes out of prefill; the KV then travels to the decode instance
    decode admission   FIFO per instance while sequence slots and KV blocks last (else it waits)
    decode             every running request on an instance advances one token per step; completion
                       times are interpolated inside the tick
    KV overflow        the latest-admitted requests are preempted and recomputed on the same instance

Nothing reads the wall clock, so a spec, a trace and a seed give the same results every run.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from services.common.cluster import (
    ClusterSnapshot,
    InstanceSpec,
    InstanceState,
    RequestLoad,
    RequestPhase,
    Route,
    RouteRequest,
    WorkerLoad,
)
from services.engine.sim_profile import SimProfile
from services.scheduler.policies.compiled import route_arrays
from services.scheduler.policies.config import load_policy
from services.scheduler.policies.instance_table import InstanceTable
from services.scheduler.policies.migration import MigrationConfig, plan_migrations
from services.scheduler.policies.migration_ledger import RoundLedger
from services.scheduler.policies.preemption import PreemptionConfig, PreemptionNotice, plan_evacuation
from services.scheduler.policies.routing import decide_many, why_no_route
from services.scheduler.prefix_index import PrefixIndex
from services.sim.autoscaler import Autoscaler
from services.sim.columns import Columns
from services.sim.fifo import serve_fifo
from services.sim.power import READING_S, PowerLoop, instance_watts, pool_gpu
from services.sim.prefix_cache import BlockLru
from services.sim.spec import ClusterSpec, Pool
from services.sim.spot_trace import generate as generate_spot_events
from services.sim.traces import Trace

PENDING, DONE, FAILED = 0, 1, 2
SAMPLE_S = 1.0                      # time-series resolution
MAX_DRAIN_S = 6 * 3600.0            # virtual time allowed after the last arrival before giving up
# Per-instance state, one array each, grown together as instances are added: (dtype, initial value).
INSTANCE_COLUMNS = {
    "alive": (bool, False), "draining": (bool, False), "up_at": (np.float64, 0.0), "down_at": (np.float64, math.inf),
    "can_prefill": (bool, False), "can_decode": (bool, False), "is_both": (bool, False),
    "dec_steps": (np.float64, 0.0), "dec_n": (np.int64, 0), "dec_base": (np.float64, 0.0),
    "drate": (np.float64, 0.0), "prate": (np.float64, 0.0),           # decode steps/s, prompt tokens/s
    "step_tokens": (np.float64, 0.0), "step_left": (np.float64, 0.0),  # prompt tokens of the step in progress
    "pool_index": (np.int64, 0),
    "clock_ratio": (np.float64, 1.0),                                  # SM clock / maximum (power caps)
    "busy_avg": (np.float64, 0.0), "reading_watts": (np.float64, 0.0),  # the ~1 s power reading
}


@dataclass
class Outcome:
    """Per-request results (arrays over the trace's requests) and the run's counters and time series."""
    spec: ClusterSpec
    trace: Trace
    status: np.ndarray              # PENDING / DONE / FAILED
    t_first: np.ndarray             # first token time (s), NaN if none
    t_done: np.ndarray              # completion time (s), NaN if not completed
    num_migrations: np.ndarray
    num_preemptions: np.ndarray
    failures: Counter
    migrations: Counter             # (reason, outcome) -> count
    spot: Counter                   # notices, instances killed, requests re-routed after a kill, evacuation_*
    autoscale: Counter              # decisions, instances added / drained / reclaimed / removed
    prefix_blocks: dict[str, int]   # prompt / local_hit / kvstore_hit blocks (trace-block granularity)
    gpu_seconds: dict[str, float]   # per pool
    energy_j: dict[str, float]      # per pool
    cost_usd: dict[str, float]      # per pool
    series: dict[str, np.ndarray]   # t, replicas per pool, running, queued, power_watts
    end_s: float
    power: dict                     # the power loop's summary (power.py)


class Simulator:
    def __init__(self, spec: ClusterSpec, trace: Trace, *, progress: Callable[[float], None] | None = None):
        self.spec, self.trace, self.progress = spec, trace, progress
        self.profile = SimProfile.load(spec.profile)
        self.policy = load_policy(spec.routing)
        self.prefix_index = PrefixIndex(spec.prefix_index_capacity)
        self.migration = MigrationConfig(load_balance_gap=spec.migration_load_balance_gap)
        self.preemption = PreemptionConfig()
        self.gpu_models = [pool_gpu(spec.gpus[p.gpu]) for p in spec.pools]
        self.bs = spec.engine.block_size
        self.max_model_len = spec.engine.max_model_len or self.profile.max_model_len
        self.kv_bytes = float(self.profile.kv_bytes_per_token)
        self._init_instances()
        self._init_requests()

    # -- setup ------------------------------------------------------------------------------------
    def _init_instances(self) -> None:
        spec = self.spec
        self.ids: list[str] = []
        self.pool_of: list[Pool] = []
        for name, (dtype, initial) in INSTANCE_COLUMNS.items():
            setattr(self, name, np.full(0, initial, dtype))
        for pool in spec.pools:
            self.add_instances(pool, pool.replicas, serving_at=0.0)
        self.caches = {}
        self._last_table, self._last_rows = None, None
        self.kvstore = BlockLru(spec.kvstore_blocks) if spec.kvstore_blocks > 0 else None

    def add_instances(self, pool: Pool, n: int, serving_at: float) -> None:
        """`n` new instances of `pool`: paid for from now on, routed to from `serving_at`."""
        for _ in range(n):
            k = sum(1 for p in self.pool_of if p.name == pool.name)
            self.ids.append(f"{pool.name}-{k:04d}")
            self.pool_of.append(pool)
            self._grow_to(len(self.ids))
            self._activate(len(self.ids) - 1, at=serving_at)

    def _grow_to(self, size: int) -> None:
        """Room for `size` instances in every per-instance array (doubling, so adding one is cheap)."""
        have = len(self.alive)
        if size <= have:
            return
        extra = max(size, 2 * have) - have
        for name, (dtype, initial) in INSTANCE_COLUMNS.items():
            setattr(self, name, np.concatenate((getattr(self, name), np.full(extra, initial, dtype))))

    def remove_instance(self, i: int) -> None:
        """Instance `i` stops existing (and costing): off the prefix index, its cache dropped."""
        self.alive[i], self.draining[i] = False, False
        self.prefix_index.remove_instance(self.ids[i])
        self.caches.pop(i, None)
        self.dec_n[i], self.dec_base[i] = 0, 0.0

    def _activate(self, i: int, at: float) -> None:
        pool = self.pool_of[i]
        self.alive[i], self.up_at[i] = True, at
        self.can_prefill[i], self.can_decode[i] = pool.role.can_prefill, pool.role.can_decode
        self.is_both[i] = pool.name == "colocated"
        self.pool_index[i] = [p.name for p in self.spec.pools].index(pool.name)

    def _init_requests(self) -> None:
        t = self.trace
        n = len(t)
        self.prompt = np.asarray(t.num_prompt_tokens, dtype=np.int64)
        self.output = np.maximum(1, np.asarray(t.num_output_tokens, dtype=np.int64))
        self.status = np.zeros(n, np.int8)
        self.t_first, self.t_done = np.full(n, np.nan), np.full(n, np.nan)
        self.n_migr, self.n_preempt = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.failures: Counter = Counter()
        self.migrations: Counter = Counter()
        self.spot: Counter = Counter()
        self.prefix_blocks = {"prompt": 0, "local_hit": 0, "kvstore_hit": 0}
        # work queues: prompt work on prefill-capable instances; KV on its way to / waiting at a decode
        # instance; requests decoding (their progress is `steps` of their instance minus `join`)
        self.prefill = Columns(req=np.int64, inst=np.int64, avail=np.float64, remaining=np.float64,
                               seq=np.int64, dest=np.int64, ctx=np.int64, left=np.int64, fresh=bool)
        self.inbox = Columns(req=np.int64, inst=np.int64, ready=np.float64, ctx=np.int64, left=np.int64,
                             seq=np.int64)
        self.running = Columns(req=np.int64, inst=np.int64, join=np.float64, target=np.float64, ctx0=np.int64)
        self.reroutes = Columns(req=np.int64, t=np.float64, ctx=np.int64, left=np.int64)
        self.pending_migrations: list[tuple[float, int, int, int, str]] = []   # (switch_t, req, src, dst, reason)
        self.seq = 0
        self.route_calls = 0
        f = t.block_size // self.bs if t.block_size % self.bs == 0 else 0
        self.keys_per_hash = f

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> Outcome:
        spec, dt = self.spec, self.spec.tick
        arrival = self.trace.arrival_s
        events = sorted(spec.spot + self._market_events(), key=lambda e: e.at_s)
        next_heartbeat = next_migration = next_sample = 0.0
        series: dict[str, list] = {"t": [], "running": [], "queued": [], "power_watts": [], "capped": []}
        for p in spec.pools:
            series[f"replicas_{p.name}"] = []
        self.gpu_s = np.zeros(len(spec.pools))
        self.energy = np.zeros(len(spec.pools))
        autoscaler = Autoscaler(self) if spec.autoscale.enabled else None
        self.power = PowerLoop(self)
        self.second_joules, self.second_s = 0.0, 0.0
        cursor, t0 = 0, 0.0
        table = None
        end = float(arrival[-1]) if len(arrival) else 0.0
        while True:
            t1 = t0 + dt
            while events and events[0].at_s < t1:
                self._spot_event(events.pop(0))
            removed = self._kill_due(t0)
            if autoscaler is not None:
                removed |= autoscaler.tick(t0)
            if removed:
                table = None            # no route may reach a removed instance, even between heartbeats
            if t0 >= next_heartbeat or table is None:
                table, rows = self._heartbeat(t0)
                next_heartbeat = t0 + spec.heartbeat_interval_s
            self.power.tick(t0)
            if spec.migration_interval_s > 0 and t0 >= next_migration:
                self._plan_migrations(t0)
                next_migration = t0 + spec.migration_interval_s
            stop = int(np.searchsorted(arrival, t1, side="left"))
            self._route(t0, np.arange(cursor, stop), table, rows)
            cursor = stop
            self._step_times()
            self._serve_prefill(t0, t1)
            self._admit(t0, t1)
            self._decode(t0, t1)
            self._switch_migrations(t0, t1)
            self._overflow(t1)
            self._account(dt)
            if t1 >= next_sample + SAMPLE_S - 1e-9:
                mean_watts = self.second_joules / self.second_s
                self.power.observe_second(mean_watts)
                self._sample(series, next_sample, mean_watts)
                self.second_joules, self.second_s = 0.0, 0.0
                next_sample += SAMPLE_S
            t0 = t1
            if self.progress is not None:
                self.progress(t0)
            idle = not (len(self.prefill) or len(self.inbox) or len(self.running) or len(self.reroutes)
                        or self.pending_migrations)
            if cursor >= len(arrival) and idle and t0 > end:
                break
            if t0 > end + MAX_DRAIN_S:
                stuck = self.status == PENDING
                self.failures[f"still in flight {MAX_DRAIN_S:g} s after the last arrival"] += int(stuck.sum())
                self.status[stuck] = FAILED
                break
        return Outcome(spec, self.trace, self.status, self.t_first, self.t_done, self.n_migr, self.n_preempt,
                       self.failures, self.migrations, self.spot,
                       autoscaler.counts if autoscaler is not None else Counter(), self.prefix_blocks,
                       self._per_pool(self.gpu_s), self._per_pool(self.energy),
                       {p.name: float(self.gpu_s[k] / 3600 * spec.gpus[p.gpu].price_per_hour)
                        for k, p in enumerate(spec.pools)},
                       {k: np.asarray(v) for k, v in series.items()}, t0, self.power.summary())

    def _market_events(self) -> tuple:
        market = self.spec.spot_market
        if not market.pool_names:
            return ()
        sizes = {p.name: p.replicas for p in self.spec.pools}
        return generate_spot_events(market, sizes, float(self.trace.arrival_s[-1]) if len(self.trace) else 0.0)

    def _per_pool(self, values: np.ndarray) -> dict[str, float]:
        return {p.name: float(values[k]) for k, p in enumerate(self.spec.pools)}

    # -- scheduler side ---------------------------------------------------------------------------
    def _heartbeat(self, now: float) -> tuple[InstanceTable, np.ndarray]:
        """The alive instances' load as the scheduler's table (what their heartbeats would report)."""
        rows = np.flatnonzero(self.alive & (self.up_at <= now))
        n = self.dec_n[rows]
        pool_blocks = self.spec.engine.num_blocks
        used = self.used_blocks()[rows]
        pre_count = np.bincount(self.prefill.inst, minlength=len(self.alive))[rows]
        pre_tokens = np.bincount(self.prefill.inst, weights=self.prefill.remaining, minlength=len(self.alive))[rows]
        inbox = np.bincount(self.inbox.inst, minlength=len(self.alive))[rows]
        size = len(rows)
        columns = {
            "can_prefill": self.can_prefill[rows], "can_decode": self.can_decode[rows],
            "is_both": self.is_both[rows], "model_code": np.zeros(size, np.int64),
            "last_heartbeat": np.full(size, now), "draining": self.draining[rows],
            "block_size": np.full(size, self.bs), "max_model_len": np.full(size, self.max_model_len),
            "num_blocks": np.full(size, pool_blocks), "num_free_blocks": np.maximum(0, pool_blocks - used),
            "num_running": n + np.minimum(pre_count, 1), "num_queued": n + pre_count + inbox,
            "num_waiting_tokens": pre_tokens.astype(np.int64),
            "queued_blocks": np.ceil(pre_tokens / self.bs).astype(np.int64),
            "high_priority_headroom": np.zeros(size, np.int64),
        }
        same = self._last_table if self._last_rows is not None and np.array_equal(rows, self._last_rows) else None
        ids = same.ids if same is not None else [self.ids[i] for i in rows]
        table = InstanceTable.from_columns(ids, columns, {self.spec.model: 0}, same_ids_as=same)
        self._last_table, self._last_rows = table, rows
        return table, rows

    def _route(self, t0: float, arrivals: np.ndarray, table: InstanceTable, rows: np.ndarray) -> None:
        """Route this tick's arrivals (and re-routes after a kill) in arrival order."""
        rr = self.reroutes
        due = rr.t < t0 + self.spec.tick
        reqs = np.concatenate((arrivals, rr.req[due]))
        if len(reqs) == 0:
            return
        times = np.concatenate((self.trace.arrival_s[arrivals], rr.t[due]))
        ctx = np.concatenate((self.prompt[arrivals], rr.ctx[due]))
        left = np.concatenate((self.output[arrivals] - 1, rr.left[due]))
        fresh = np.concatenate((np.ones(len(arrivals), bool), np.isnan(self.t_first[rr.req[due]])))
        rr.keep(~due)
        order = np.argsort(times, kind="stable")
        reqs, times, ctx, left, fresh = reqs[order], times[order], ctx[order], left[order], fresh[order]
        snapshot = ClusterSnapshot(now=t0, heartbeat_timeout_s=3.0)
        route = self._route_keyed if self.trace.has_prefix_hashes else self._route_plain
        prefill, decode = route(snapshot, table, rows, reqs, ctx, left)
        self.route_calls += len(reqs)
        ok = prefill >= 0
        self.status[reqs[~ok]] = FAILED
        reqs, times, ctx, left, fresh, prefill, decode = (a[ok] for a in (reqs, times, ctx, left, fresh, prefill, decode))
        cached, fetch = np.zeros(len(reqs), np.int64), np.zeros(len(reqs))
        if self.trace.has_prefix_hashes:
            for k in range(len(reqs)):
                cached[k], fetch[k] = self._prefix_hits(int(reqs[k]), int(prefill[k]), int(ctx[k]), bool(fresh[k]))
        n = len(reqs)
        self.prefill.append(req=reqs, inst=prefill, avail=times + fetch, remaining=np.maximum(1, ctx - cached),
                            seq=np.arange(self.seq, self.seq + n), dest=decode, ctx=ctx + 1, left=left, fresh=fresh)
        self.seq += n

    def _route_plain(self, snapshot, table, rows, reqs, ctx, left) -> tuple[np.ndarray, np.ndarray]:
        """Requests without block keys, as arrays straight into the compiled pipeline (decide_many's own
        kernel; building a RouteRequest per request would cost more than routing it)."""
        n = len(reqs)

        def no_route(i: int) -> None:
            request = RouteRequest(str(int(reqs[i])), self.spec.model, (), int(ctx[i]), int(left[i]) + 1)
            why = why_no_route(snapshot, table, request, self.policy, self.prefix_index, self.route_calls + i)
            self.failures[failure_kind(why.reason)] += 1

        prefill, decode = route_arrays(snapshot, table, self.policy, ctx.astype(np.int64), (left + 1).astype(np.int64),
                                       np.zeros(n, bool), np.zeros(n, np.int64), self.route_calls, no_route)
        found = prefill >= 0
        return np.where(found, rows[prefill], -1), np.where(found, rows[decode], -1)

    def _route_keyed(self, snapshot, table, rows, reqs, ctx, left) -> tuple[np.ndarray, np.ndarray]:
        """Requests with block keys through decide_many (the prefix index changes with every route)."""
        requests = [RouteRequest(str(r), self.spec.model, self._keys(r, c), c, lf + 1)
                    for r, c, lf in zip(reqs.tolist(), ctx.tolist(), left.tolist())]
        decisions = decide_many(snapshot, requests, self.policy, self.prefix_index, first_ordinal=self.route_calls,
                                table=table)
        index_of = {self.ids[i]: i for i in rows}
        prefill, decode = np.full(len(reqs), -1, np.int64), np.full(len(reqs), -1, np.int64)
        for k, decision in enumerate(decisions):
            if isinstance(decision, Route):
                prefill[k], decode[k] = index_of[decision.prefill_id], index_of[decision.decode_id]
            else:
                self.failures[failure_kind(decision.reason)] += 1
        return prefill, decode

    def _keys(self, r: int, num_tokens: int) -> tuple[bytes, ...]:
        """The request's block keys as the gateway sends them: one per full engine block, chained (the
        trace's hash of a 512-token block stands for its engine blocks, told apart by position)."""
        f = self.keys_per_hash
        if not f or not self.trace.has_prefix_hashes:
            return ()
        hashes = self.trace.prefix_hashes[r].tolist()
        n = min(num_tokens // self.bs, len(hashes) * f)
        return tuple(((hashes[j // f] << 8) | (j % f)).to_bytes(16, "little", signed=True) for j in range(n))

    def _prefix_hits(self, r: int, inst: int, num_tokens: int, count: bool) -> tuple[int, float]:
        """Prompt tokens the chosen prefill instance finds cached (its own cache, then the kvstore), and
        the seconds to fetch the kvstore's part. Updates the caches with this prompt."""
        if not self.trace.has_prefix_hashes:
            return 0, 0.0
        hashes = self.trace.prefix_hashes[r]
        cache = self.caches.get(inst)
        if cache is None:
            cache = self.caches[inst] = BlockLru(self.spec.engine.num_blocks * self.bs // self.trace.block_size)
        local = cache.leading_hits(hashes)
        stored = self.kvstore.leading_hits(hashes, local) if self.kvstore else 0
        cache.insert(hashes)
        if self.kvstore:
            self.kvstore.insert(hashes)
        if count:
            self.prefix_blocks["prompt"] += len(hashes)
            self.prefix_blocks["local_hit"] += local
            self.prefix_blocks["kvstore_hit"] += stored
        size = self.trace.block_size
        cached = min(num_tokens - 1, (local + stored) * size)
        fetch = stored * size * self.kv_bytes / self.spec.kv_bandwidth_bytes_per_s if stored else 0.0
        return max(0, cached), fetch + (self.spec.kv_latency_s if stored else 0.0)

    # -- engines ----------------------------------------------------------------------------------
    def used_blocks(self) -> np.ndarray:
        sum_ctx = self.dec_base + self.dec_n * self.dec_steps
        return np.ceil(sum_ctx / self.bs + 0.5 * self.dec_n).astype(np.int64)

    def _step_times(self) -> None:
        """Each instance's step: its decodes plus, when it has prompt work, one chunk of it: the waiting
        prompt tokens up to the step's token budget (the engine's StepScheduler), fixed when the step
        starts and kept until its tokens are done, however many ticks that takes."""
        n = self.dec_n
        sum_ctx = self.dec_base + n * self.dec_steps
        pre_tokens = np.bincount(self.prefill.inst, weights=self.prefill.remaining, minlength=len(n))
        budget = self.spec.engine.max_num_batched_tokens
        new_step = (self.step_left <= 0) & (pre_tokens > 0)
        self.step_tokens = np.where(new_step, np.maximum(1.0, np.minimum(budget - n, pre_tokens)),
                                    np.where(pre_tokens > 0, self.step_tokens, 0.0))
        self.step_left = np.where(new_step, self.step_tokens, np.where(pre_tokens > 0, self.step_left, 0.0))
        self.chunk = self.step_tokens
        self.prefill_busy = np.zeros(len(n))
        self._set_rates(sum_ctx)

    def _set_rates(self, sum_ctx: np.ndarray) -> None:
        n, chunk = self.dec_n, self.chunk
        tokens, attended, read = n + chunk, sum_ctx + chunk * (chunk + 1) / 2, sum_ctx + chunk
        ratio = self.clock_ratio
        if (ratio == 1.0).all():
            step = self.profile.seconds(tokens, attended, read)
        else:                           # a capped clock slows compute 1/f, memory (1/f)^0.1 (sim_profile.py)
            step = np.empty(len(n))
            for r in np.unique(ratio).tolist():
                at = ratio == r
                step[at] = self.profile.seconds(tokens[at], attended[at], read[at], r)
        self.drate = np.where(n > 0, 1.0 / step, 0.0)
        self.prate = np.where(chunk > 0, chunk / step, 0.0)

    def _serve_prefill(self, t0: float, t1: float) -> None:
        q = self.prefill
        if not len(q):
            return
        q.reorder(np.lexsort((q.seq, q.inst)))
        rate = self.prate[q.inst]
        start, finish = serve_fifo(q.inst, q.avail, q.remaining / rate, t0)
        served = np.clip(np.minimum(finish, t1) - start, 0.0, None)
        self.prefill_busy = np.minimum(1.0, np.bincount(q.inst, weights=served, minlength=len(self.alive)) / (t1 - t0))
        done = finish <= t1
        self.step_left -= np.bincount(q.inst, weights=served * rate, minlength=len(self.step_left))
        q.remaining = np.where(done, 0.0, q.remaining - served * rate)
        if done.any():
            req, inst, dest = q.req[done], q.inst[done], q.dest[done]
            fin, ctx, left, fresh = finish[done], q.ctx[done], q.left[done], q.fresh[done]
            self.t_first[req[fresh]] = fin[fresh]
            over = left <= 0
            self.t_done[req[over]], self.status[req[over]] = fin[over], DONE
            go = ~over
            remote = dest[go] != inst[go]
            transfer = np.where(remote, self.spec.kv_latency_s + ctx[go] * self.kv_bytes
                                / self.spec.kv_bandwidth_bytes_per_s, 0.0)
            n = int(go.sum())
            self.inbox.append(req=req[go], inst=dest[go], ready=fin[go] + transfer, ctx=ctx[go], left=left[go],
                              seq=np.arange(self.seq, self.seq + n))
            self.seq += n
        q.keep(~done)

    def _admit(self, t0: float, t1: float) -> None:
        """Move arrived KV into decode batches, FIFO per instance, while slots and blocks last."""
        box = self.inbox
        if not len(box) or not (box.ready < t1).any():
            return
        box.reorder(np.lexsort((box.seq, box.ready, box.inst)))
        here = box.ready < t1
        idx = np.flatnonzero(here)
        inst = box.inst[idx]
        first = np.r_[True, inst[1:] != inst[:-1]]
        run = np.cumsum(first) - 1
        starts = np.flatnonzero(first)
        rank = np.arange(len(idx)) - starts[run]
        need = -(-(box.ctx[idx] + 1) // self.bs)
        cum = np.cumsum(need)
        cum_in_run = cum - (cum - need)[starts][run]
        slots = self.spec.engine.max_num_seqs - self.dec_n[inst]
        free = self.spec.engine.num_blocks - self.used_blocks()[inst]
        ok = (rank < slots) & (cum_in_run <= free)
        if not ok.any():
            return
        take = idx[ok]
        inst = box.inst[take]
        sum_ctx_before = self.dec_base + self.dec_n * self.dec_steps
        counts = np.bincount(inst, minlength=len(self.dec_n))
        self.dec_n += counts
        self._set_rates(sum_ctx_before + np.bincount(inst, weights=box.ctx[take], minlength=len(self.dec_n)))
        join_t = np.maximum(box.ready[take], t0)
        join = self.dec_steps[inst] + (join_t - t0) * self.drate[inst]
        ctx0 = box.ctx[take]
        self.dec_base += np.bincount(inst, weights=ctx0 - join, minlength=len(self.dec_n))
        self.running.append(req=box.req[take], inst=inst, join=join, target=join + box.left[take], ctx0=ctx0)
        keep = np.ones(len(box), bool)
        keep[take] = False
        box.keep(keep)

    def _decode(self, t0: float, t1: float) -> None:
        run = self.running
        old = self.dec_steps.copy()
        self.dec_steps += (t1 - t0) * self.drate
        if not len(run):
            return
        done = run.target <= self.dec_steps[run.inst]
        if not done.any():
            return
        inst, req = run.inst[done], run.req[done]
        self.t_done[req] = t0 + (run.target[done] - old[inst]) / self.drate[inst]
        self.status[req] = DONE
        self._leave(done)

    def _leave(self, mask: np.ndarray) -> None:
        """Take the masked running entries off their instances' batches."""
        run = self.running
        inst = run.inst[mask]
        self.dec_n -= np.bincount(inst, minlength=len(self.dec_n))
        self.dec_base -= np.bincount(inst, weights=run.ctx0[mask] - run.join[mask], minlength=len(self.dec_n))
        run.keep(~mask)

    def _overflow(self, now: float) -> None:
        """KV full: preempt the latest-admitted requests (the engine's policy) and recompute them."""
        over = np.flatnonzero(self.used_blocks() > self.spec.engine.num_blocks)
        for i in over.tolist():
            run = self.running
            mine = np.flatnonzero(run.inst == i)
            victims = mine[np.argsort(-run.join[mine], kind="stable")]
            excess = int(self.used_blocks()[i]) - self.spec.engine.num_blocks
            chosen, freed = [], 0
            for v in victims.tolist():
                if freed >= excess or len(chosen) == len(mine) - 1:
                    break
                ctx = run.ctx0[v] + (self.dec_steps[i] - run.join[v])
                chosen.append(v)
                freed += math.ceil(ctx / self.bs)
            if not chosen:
                continue
            chosen = np.asarray(chosen)
            ctx = (run.ctx0[chosen] + (self.dec_steps[i] - run.join[chosen])).astype(np.int64)
            left = np.ceil(run.target[chosen] - self.dec_steps[i]).astype(np.int64)
            req = run.req[chosen]
            self.n_preempt[req] += 1
            n = len(chosen)
            self.prefill.append(req=req, inst=i, avail=now, remaining=ctx.astype(np.float64),
                                seq=np.arange(self.seq, self.seq + n), dest=i, ctx=ctx, left=left, fresh=False)
            self.seq += n
            mask = np.zeros(len(run), bool)
            mask[chosen] = True
            self._leave(mask)

    # -- migration (Llumnix) --------------------------------------------------------------------------
    def _decode_snapshot(self, now: float) -> ClusterSnapshot:
        """Decode-capable instances with their running requests, as heartbeats report them."""
        run, states = self.running, []
        by_inst: dict[int, list[RequestLoad]] = {}
        for k in range(len(run)):
            i = int(run.inst[k])
            ctx = int(run.ctx0[k] + self.dec_steps[i] - run.join[k])
            by_inst.setdefault(i, []).append(RequestLoad(
                str(int(run.req[k])), RequestPhase.DECODING, num_tokens=ctx, num_blocks=-(-ctx // self.bs),
                arrival=int(run.join[k] * 1e3), max_tokens=max(0, int(run.target[k] - self.dec_steps[i]))))
        used = self.used_blocks()
        waiting = np.bincount(self.inbox.inst, minlength=len(self.alive))
        for i in np.flatnonzero(self.alive & (self.up_at <= now) & self.can_decode).tolist():
            spec = InstanceSpec(self.ids[i], self.pool_of[i].role, "sim", self.spec.model, self.bs,
                                self.max_model_len)
            load = WorkerLoad(num_running=int(self.dec_n[i]), num_waiting=int(waiting[i]),
                              num_blocks=self.spec.engine.num_blocks,
                              num_free_blocks=max(0, self.spec.engine.num_blocks - int(used[i])),
                              draining=bool(self.draining[i]), requests=tuple(by_inst.get(i, ())))
            states.append(InstanceState(spec, load, now))
        return ClusterSnapshot(now, tuple(sorted(states, key=lambda s: s.instance_id)), 3.0)

    def _plan_migrations(self, now: float) -> None:
        """One round: evacuate the noticed instances just in time (planner mode), then the other
        migration policies on the same ledger, so they see the room the evacuation took."""
        in_flight = frozenset(str(m[1]) for m in self.pending_migrations)
        index_of = {name: i for i, name in enumerate(self.ids)}
        snapshot = self._decode_snapshot(now)
        ledger = RoundLedger(snapshot, in_flight, self.migration.growth_margin_tokens)
        if self.spec.preemption == "planner":
            self._plan_evacuations(ledger, now)
        tokens = {r.request_id: r.num_tokens for s in snapshot.instances for r in s.load.requests}
        for m in plan_migrations(snapshot, self.migration, in_flight, ledger=ledger):
            r = int(m.request_id)
            copy_s = self.spec.kv_latency_s + tokens[m.request_id] * self.kv_bytes / self.spec.kv_bandwidth_bytes_per_s
            self.pending_migrations.append((now + copy_s, r, index_of[m.source_id], index_of[m.destination_id],
                                            m.reason.value))

    def _plan_evacuations(self, ledger: RoundLedger, now: float) -> None:
        """plan_evacuation for each instance with a notice, its seconds per token measured now (the
        step time of its batch; None while it decodes nothing)."""
        noticed = np.flatnonzero(self.alive & np.isfinite(self.down_at) & self.can_decode)
        for i in noticed.tolist():
            seconds_per_token = 1.0 / self.drate[i] if self.drate[i] > 0 else None
            notice = PreemptionNotice(self.ids[i], float(self.down_at[i]), "sim")
            for decision in plan_evacuation(ledger, notice, now, self.preemption, seconds_per_token):
                self.spot[f"evacuation_{decision.action.value}"] += 1

    def _switch_migrations(self, t0: float, t1: float) -> None:
        """Migrations whose copy ends in this tick move their request (it decoded on meanwhile)."""
        due = [m for m in self.pending_migrations if m[0] < t1]
        if not due:
            return
        self.pending_migrations = [m for m in self.pending_migrations if m[0] >= t1]
        for switch_t, r, src, dst, reason in due:
            run = self.running
            where = np.flatnonzero((run.req == r) & (run.inst == src))
            if not len(where) or not self.alive[dst]:
                self.migrations[(reason, "aborted")] += 1
                continue
            k = int(where[0])
            at = max(switch_t, t0)
            src_steps = self.dec_steps[src] - (t1 - at) * self.drate[src]
            left = run.target[k] - src_steps
            ctx = int(run.ctx0[k] + src_steps - run.join[k])
            need = -(-ctx // self.bs)
            if (self.dec_n[dst] >= self.spec.engine.max_num_seqs
                    or need > self.spec.engine.num_blocks - self.used_blocks()[dst]):
                self.migrations[(reason, "aborted")] += 1
                continue
            mask = np.zeros(len(run), bool)
            mask[k] = True
            self._leave(mask)
            join = self.dec_steps[dst] - (t1 - at) * self.drate[dst]
            self.dec_n[dst] += 1
            self.dec_base[dst] += ctx - join
            self.running.append(req=r, inst=dst, join=join, target=join + left, ctx0=ctx)
            self.n_migr[r] += 1
            self.migrations[(reason, "completed")] += 1

    # -- spot availability ------------------------------------------------------------------------------
    def _spot_event(self, event) -> None:
        if event.preempt:
            if event.preempt not in self.ids:
                raise ValueError(f"spot event at {event.at_s}s preempts unknown instance {event.preempt!r}")
            i = self.ids.index(event.preempt)
            self.spot["notices"] += 1
            self.draining[i] = self.spec.preemption == "planner"      # reroute, restart: the notice goes unheeded
            self.down_at[i] = event.at_s + event.notice_s
            return
        pool = next((p for p in self.spec.pools if p.name == event.add), None)
        if pool is None:
            raise ValueError(f"spot event at {event.at_s}s adds to unknown pool {event.add!r}")
        self.add_instances(pool, event.replicas, serving_at=event.at_s + event.startup_s)

    def _kill_due(self, now: float) -> bool:
        """Instances past their deadline die; whatever they held is routed again from its tokens so far.
        True when one died."""
        dead = np.flatnonzero(self.alive & (self.down_at <= now))
        for i in dead.tolist():
            self.spot["instances_killed"] += 1
            run = self.running
            mine = run.inst == i
            ctx = (run.ctx0[mine] + self.dec_steps[i] - run.join[mine]).astype(np.int64)
            self._reroute(run.req[mine], now, ctx, np.ceil(run.target[mine] - self.dec_steps[i]).astype(np.int64))
            self.spot["requests_rerouted"] += int(mine.sum())
            self._leave(mine)
            for q, ctx_name in ((self.prefill, "ctx"), (self.inbox, "ctx")):
                lost = (q.inst == i) | ((q.dest == i) if q is self.prefill else False)
                if lost.any():
                    self.spot["requests_rerouted"] += int(lost.sum())
                    self._reroute(q.req[lost], now, getattr(q, ctx_name)[lost] - 1, q.left[lost])
                    q.keep(~lost)
            self.remove_instance(i)
        return len(dead) > 0

    def _reroute(self, req: np.ndarray, now: float, ctx: np.ndarray, left: np.ndarray) -> None:
        """Route killed requests again: from their tokens so far (recompute the context), or, with
        `preemption: restart`, from scratch (the partial output is discarded and generated again)."""
        if self.spec.preemption == "restart":
            ctx, left = self.prompt[req], self.output[req] - 1
        self.reroutes.append(req=req, t=now, ctx=ctx, left=left)

    # -- accounting ------------------------------------------------------------------------------------
    def _account(self, dt: float) -> None:
        """GPU seconds and energy of the tick: each alive instance at its busy share (steps run back to
        back while it decodes; prefill's share of the tick otherwise) and clock (power.py's model)."""
        up = self.alive.copy()
        busy = np.maximum(self.dec_n > 0, self.prefill_busy)
        self.busy_avg += (busy - self.busy_avg) * min(1.0, dt / READING_S)
        watts = np.zeros(len(up))
        for k, gpu in enumerate(self.gpu_models):
            mine = up & (self.pool_index == k)
            watts[mine] = instance_watts(gpu, busy[mine], self.clock_ratio[mine])
            self.reading_watts[mine] = instance_watts(gpu, self.busy_avg[mine], self.clock_ratio[mine])
            self.gpu_s[k] += dt * int(mine.sum())
            self.energy[k] += dt * float(watts[mine].sum())
        self.second_joules += dt * float(watts.sum())
        self.second_s += dt

    def _sample(self, series: dict[str, list], now: float, mean_watts: float) -> None:
        series["t"].append(now)
        series["running"].append(len(self.running))
        series["queued"].append(len(self.prefill) + len(self.inbox))
        series["power_watts"].append(mean_watts)
        series["capped"].append(int((self.alive & (self.clock_ratio < 1.0)).sum()))
        for k, p in enumerate(self.spec.pools):
            series[f"replicas_{p.name}"].append(int((self.alive & (self.pool_index == k)).sum()))


def failure_kind(reason: str) -> str:
    """NoRoute reasons grouped by the filter that emptied the list (the live gateway answers 503)."""
    found = re.search(r"\(filter (\w+)\)", reason)
    return f"no route: {found.group(1)}" if found else f"no route: {reason}"


def simulate(spec: ClusterSpec, trace: Trace, progress: Callable[[float], None] | None = None) -> Outcome:
    return Simulator(spec, trace, progress=progress).run()
