"""Minimum-cost assignment (Kuhn–Munkres): give each row its own column so the summed cost is least.

The preemption planner uses it to map the requests leaving a preempted instance onto slots of the
surviving instances (SpotServe maps work onto survivors the same way). It is the O(n²·m) form with
row and column potentials (Jonker–Volgenant's shortest augmenting paths): n rows, m >= n columns.
Pure Python: the planner keeps n to a round's worth of requests.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def min_cost_assignment(cost: Sequence[Sequence[float]]) -> list[int]:
    """The column of each row in an assignment of least total cost (ties: the first found). Rows must be
    no more than columns; `math.inf` marks a forbidden pair, and ValueError says when no assignment
    avoids them."""
    n = len(cost)
    if n == 0:
        return []
    m = len(cost[0])
    if any(len(row) != m for row in cost) or n > m:
        raise ValueError(f"need a rectangular matrix with rows <= columns, got {n} rows of {[len(r) for r in cost]}")
    big = 1.0 + 2 * sum(abs(c) for row in cost for c in row if math.isfinite(c)) * max(n, 1)
    a = [[c if math.isfinite(c) else big for c in row] for row in cost]
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner, way = [0] * (m + 1), [0] * (m + 1)          # owner[j]: the row holding column j (1-based; 0 none)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv, used = [math.inf] * (m + 1), [False] * (m + 1)
        while owner[j0]:
            used[j0] = True
            i0, delta, j1 = owner[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = a[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < minv[j]:
                        minv[j], way[j] = reduced, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:                                       # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    columns = [0] * n
    for j in range(1, m + 1):
        if owner[j]:
            columns[owner[j] - 1] = j - 1
    if any(not math.isfinite(cost[r][c]) for r, c in enumerate(columns)):
        raise ValueError("every assignment uses a forbidden (infinite-cost) pair")
    return columns
