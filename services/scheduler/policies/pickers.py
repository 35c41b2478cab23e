"""Pickers: the last step of a profile, one instance among the filtered candidates.

    highest       the highest total score, ties to the smallest id (routing.PickHighest)
    round_robin   the candidates in id order, the (ordinal mod n)-th: a load-blind baseline to compare
                  the scoring pipeline against. Deterministic: `ordinal` is the caller's count of Route
                  calls (RouteContext.ordinal), so the policy stays a pure function.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.scheduler.policies.routing import Picker, PickHighest, RouteContext


@dataclass(frozen=True, slots=True)
class RoundRobin:
    name = "round_robin"

    def pick(self, ctx: RouteContext, rows: np.ndarray, scores: np.ndarray) -> int:
        in_id_order = rows[np.argsort(ctx.table.id_rank[rows], kind="stable")]
        return int(in_id_order[ctx.ordinal % len(in_id_order)])


PICKERS: dict[str, type[Picker]] = {p.name: p for p in (PickHighest, RoundRobin)}
