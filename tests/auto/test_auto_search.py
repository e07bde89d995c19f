"""The knapsack solver against brute force, and the Pareto front."""

from __future__ import annotations

import itertools

import numpy as np

from openautoglm.auto.search import mckp, pareto


def _brute(costs, sizes, cap):
    best = np.inf
    for ch in itertools.product(range(len(costs[0])), repeat=len(costs)):
        if sum(s[o] for s, o in zip(sizes, ch)) <= cap:
            best = min(best, sum(c[o] for c, o in zip(costs, ch)))
    return best


def test_mckp_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = [rng.integers(100, 1000, size=3) for _ in range(5)]
        costs = [rng.random(3) for _ in range(5)]
        cap = int(rng.integers(1500, 4000))
        best = _brute(costs, sizes, cap)
        cost, choice, *_ = mckp(costs, sizes, cap, resolution=100000)
        if not np.isfinite(best):
            assert choice is None
            continue
        assert sum(s[o] for s, o in zip(sizes, choice)) <= cap      # never over the budget
        assert abs(cost - best) < 1e-9
        _, coarse, *_ = mckp(costs, sizes, cap, resolution=16)       # rounding up: still feasible
        assert coarse is None or sum(s[o] for s, o in zip(sizes, coarse)) <= cap


def test_pareto_front():
    assert pareto([(1, 5.0), (2, 4.0), (2, 6.0), (3, 4.5), (4, 1.0)]) == [0, 1, 4]
