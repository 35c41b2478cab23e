"""One tick of many first-come-first-served queues at once, in closed form (no per-request loop).

Each queue is one server (an instance's prefill) that is free at `t0`; its entries, in order, become
available at `avail` and need `service` seconds. The Lindley recursion

    finish[k] = max(avail[k], finish[k-1]) + service[k]

has the closed form finish[k] = S[k] + max_{j<=k}(avail[j] - S[j-1]) with S the running sum of
`service`, so a cumulative sum and a running maximum per queue give every finish time. Queues are
runs of equal `queue` ids; the running maximum is kept inside each run by lifting run g by g·BIG.
"""
from __future__ import annotations

import numpy as np


def serve_fifo(queue: np.ndarray, avail: np.ndarray, service: np.ndarray, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """(start, finish) times of every entry; `queue` must be grouped (equal ids adjacent, FIFO order
    inside a group). Finish times may lie past the tick: the caller keeps those entries' remainder."""
    n = len(queue)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(queue[1:], queue[:-1], out=first[1:])
    run = np.cumsum(first) - 1
    total = np.cumsum(service)
    before_run = (total - service)[first]          # the sum of everything before each run
    done_by = total - before_run[run]              # running sum inside the run, this entry included
    v = np.maximum(avail, t0) - t0 - (done_by - service)
    lift = 2.0 * (float(np.abs(v).max()) + 1.0)
    finish = t0 + done_by + np.maximum.accumulate(v + run * lift) - run * lift
    return finish - service, finish
