"""`Evacuator`: the preemption notices in force, fed to the just-in-time planner every migration round.

    NotifyPreemption ─▶ notify(notice): drained already (no new requests), the notice kept here
    every migration round ─▶ plan(ledger): for each notice, soonest deadline first,
                            policies.preemption.plan_evacuation (finish in place / migrate / no room / wait)
                            on the round's ledger, before the other migration policies
    the instance deregisters or expires ─▶ forget(instance)

Whether a request finishes in place depends on how fast its instance generates: `DecodeRate` measures
seconds per token per instance from successive heartbeats (the token counts of the requests decoding in
both), smoothed. A notice whose deadline passes is judged once: the instance was empty (the goal) or not
(logged as an error and counted; its requests are lost with it unless the survivors took them since).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from services.common.cluster import ClusterSnapshot, InstanceState, RequestPhase, Role
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.policies.migration_ledger import RoundLedger
from services.scheduler.policies.preemption import (
    Action,
    Evacuation,
    PreemptionConfig,
    PreemptionNotice,
    plan_evacuation,
)

log = logging.getLogger("ferry.scheduler.evacuator")


class DecodeRate:
    """Seconds per generated token of each instance, from successive heartbeats; exponentially smoothed."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self.smoothing = smoothing
        self.seconds_per_token: dict[str, float] = {}
        self._last: dict[str, tuple[float, dict[str, int]]] = {}   # instance -> (heartbeat, tokens per request)

    def observe(self, snapshot: ClusterSnapshot) -> None:
        seen = set()
        for instance in snapshot.instances:
            seen.add(instance.instance_id)
            tokens = {r.request_id: r.num_tokens for r in instance.load.requests if r.phase is RequestPhase.DECODING}
            previous = self._last.get(instance.instance_id)
            if previous is not None and instance.last_heartbeat <= previous[0]:
                continue                                   # no heartbeat since the last round
            self._last[instance.instance_id] = (instance.last_heartbeat, tokens)
            if previous is None:
                continue
            steps = [tokens[r] - n for r, n in previous[1].items() if tokens.get(r, 0) > n]
            if steps:
                sample = (instance.last_heartbeat - previous[0]) * len(steps) / sum(steps)
                old = self.seconds_per_token.get(instance.instance_id)
                self.seconds_per_token[instance.instance_id] = \
                    sample if old is None else old + self.smoothing * (sample - old)
        for gone in set(self._last) - seen:
            self._last.pop(gone)
            self.seconds_per_token.pop(gone, None)


class Evacuator:
    def __init__(self, config: PreemptionConfig, metrics: SchedulerMetrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.metrics, self.clock = config, metrics, clock
        self.notices: dict[str, PreemptionNotice] = {}
        self.rate = DecodeRate()
        self._judged: set[str] = set()                   # notices whose deadline has been judged
        self._actions: dict[str, Action] = {}             # request id -> its last decision (logged on change)

    def notify(self, notice: PreemptionNotice) -> None:
        """A later notice for the same instance replaces the earlier one (a cloud may move the time)."""
        self.notices[notice.instance_id] = notice
        self._judged.discard(notice.instance_id)
        self.metrics.preempting_instances.set(len(self.notices))

    def forget(self, instance_id: str) -> None:
        if self.notices.pop(instance_id, None) is not None:
            self._judged.discard(instance_id)
            self.metrics.preempting_instances.set(len(self.notices))

    def plan(self, ledger: RoundLedger, now: float) -> None:
        """Decide for every noticed instance; the migrations go on `ledger` (reason preemption)."""
        self.rate.observe(ledger.snapshot)
        reported = {i.instance_id: i for i in ledger.snapshot.instances}
        decided: dict[str, Evacuation] = {}
        for notice in sorted(self.notices.values(), key=lambda n: (n.deadline, n.instance_id)):
            if notice.instance_id not in reported:
                continue                                   # not registered (yet, or any more)
            if now >= notice.deadline:
                self._judge(reported[notice.instance_id])
            for d in plan_evacuation(ledger, notice, now, self.config,
                                     self.rate.seconds_per_token.get(notice.instance_id)):
                decided[d.request_id] = d
                if self._actions.get(d.request_id) is not d.action:
                    self._log(notice, d)
                    self.metrics.evacuation_decisions.labels(action=d.action.value).inc()
        self._actions = {rid: d.action for rid, d in decided.items()}
        actions = Counter(d.action for d in decided.values())
        for action in Action:
            self.metrics.evacuating_requests.labels(action=action.value).set(actions[action])

    def _log(self, notice: PreemptionNotice, d: Evacuation) -> None:
        what = {Action.FINISH: f"finishes in place (~{d.finish_in_s:.1f} s)",
                Action.MIGRATE: f"migrates to {d.destination_id}",
                Action.NO_ROOM: "has no survivor with room (waits for capacity)",
                Action.WAIT: "waits (prefilling or already moving)"}[d.action]
        log.info("preemption of %s: %s %s", notice.instance_id, d.request_id, what)

    def replacements(self, snapshot: ClusterSnapshot) -> dict[str, int]:
        """Noticed instances per pool ("prefill" / "decode"): the capacity the platform should replace."""
        pools: Counter = Counter()
        for instance in snapshot.instances:
            if instance.instance_id in self.notices:
                pools["prefill" if instance.spec.role is Role.PREFILL else "decode"] += 1
        return dict(pools)

    def _judge(self, instance: InstanceState) -> None:
        """Once per notice, at its deadline: was the instance empty (as its last heartbeat said)?"""
        if instance.instance_id in self._judged:
            return
        self._judged.add(instance.instance_id)
        left = instance.load.requests
        self.metrics.preemption_deadlines.labels(outcome="requests_left" if left else "empty").inc()
        if left:
            log.error("%s reached its preemption deadline holding %d requests (%s)", instance.instance_id,
                      len(left), ", ".join(r.request_id for r in left[:8]))
        else:
            log.info("%s is empty at its preemption deadline", instance.instance_id)
