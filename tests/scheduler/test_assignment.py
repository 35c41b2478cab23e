"""Kuhn–Munkres against brute force: the least total cost, each row its own column."""
from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.policies.assignment import min_cost_assignment


def brute_force(cost) -> float:
    n, m = len(cost), len(cost[0])
    return min(sum(cost[r][c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))


@st.composite
def matrices(draw):
    n = draw(st.integers(1, 5))
    m = draw(st.integers(n, 6))
    return [[draw(st.integers(0, 50)) for _ in range(m)] for _ in range(n)]


@settings(max_examples=300, deadline=None)
@given(matrices())
def test_the_assignment_is_a_least_cost_one(cost):
    columns = min_cost_assignment(cost)
    assert len(set(columns)) == len(cost)
    assert sum(cost[r][c] for r, c in enumerate(columns)) == brute_force(cost)


def test_forbidden_pairs_are_avoided_and_an_impossible_matrix_is_refused():
    inf = math.inf
    assert min_cost_assignment([[inf, 1], [2, inf]]) == [1, 0]
    assert min_cost_assignment([[5, inf, inf], [1, 2, inf]]) == [0, 1]
    with pytest.raises(ValueError, match="forbidden"):
        min_cost_assignment([[inf, 1], [inf, 2]])
    with pytest.raises(ValueError, match="rows <= columns"):
        min_cost_assignment([[1], [2]])
    assert min_cost_assignment([]) == []
