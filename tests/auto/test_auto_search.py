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


def test_allocate_matches_brute_force():
    from openautoglm.auto.pruning import allocate

    rng = np.random.default_rng(1)
    for _ in range(20):
        costs = [[0.0, *np.cumsum(rng.random(3)).tolist()] for _ in range(4)]
        for n in range(0, 14):
            ks = allocate(costs, n)
            best = min((sum(c[k] for c, k in zip(costs, ch)), ch)
                       for ch in itertools.product(range(4), repeat=4) if sum(ch) == n) if n <= 12 else None
            if best is None:
                assert ks is None
                continue
            assert sum(ks) == n and abs(sum(c[k] for c, k in zip(costs, ks)) - best[0]) < 1e-12


def test_measured_levels_spare_the_costly_layer():
    from openautoglm.auto.pruning import measured_levels

    orders = [[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[2, 3], [0, 1]]]   # 3 layers x 2 groups of 2 query heads
    costs = [[0.0, 0.9], [0.0, 0.01], [0.0, 0.02]]                    # layer 0 is costly to prune
    levels = measured_levels(orders, costs, [1 / 3, 0.5, 0.6])
    assert levels[1 / 3] == {1: [0, 1], 2: [2, 3]} and 0 not in levels[1 / 3]
    assert 0.5 in levels and 0.6 not in levels                         # 4 groups: more than the costs cover


def test_denoised_signals_are_monotone_in_bits_and_non_negative():
    from openautoglm.auto.sensitivity import Sensitivities

    opts = ["bf16", "w8", "w4g128", "w4g64", "w4g32"]
    s = Sensitivities(["u"], opts, [None, 8, 4, 2], [0.0, 0.25], 2.0, [[0.0, 0.0002, 0.0006, -0.0009, -0.0008]],
                      [[0.0, -0.0001, 0.0005, 0.0004]], [0.0, -0.01], [{}, {0: [1]}])
    d = s.denoised()
    w = dict(zip(opts, d.weight[0]))
    assert min(d.weight[0]) >= 0 and w["bf16"] == 0
    assert w["bf16"] <= w["w8"] <= w["w4g32"] <= w["w4g64"] <= w["w4g128"]
    assert d.kv[0] == [0.0, 0.0, 0.00045, 0.00045] and d.prune == [0.0, 0.0]
    assert s.weight[0][3] == -0.0009                                   # the raw signals are kept for the report


def test_shrinkage_trusts_signals_only_beyond_their_noise():
    from openautoglm.auto.denoise import shrink

    noisy, w = shrink([0.001, -0.001, 0.002, 0.0], [0.002] * 4)        # spread within the noise: all -> the mean
    assert w == 0 and all(abs(v - 0.0005) < 1e-12 for v in noisy)
    clear, w = shrink([0.05, 0.001, 0.002, 0.0, float("inf")], [0.0005] * 5)  # an outlier far above the noise
    assert w > 0.99 and clear[0] > 0.049 and clear[-1] == float("inf")


def test_choose_keeps_the_uniform_recipe_unless_the_gain_beats_the_noise():
    import torch

    from openautoglm.auto.plan import choose
    from openautoglm.auto.search import Candidate

    mixed = Candidate(0.0, (1, 2), (0,), 100, 0.001)
    uni = Candidate(0.0, (1, 1), (0,), 110, 0.002, kind="uniform", label="w8 + KV bf16 + prune 0")
    runs = {mixed.key(): torch.tensor([0.010, 0.002, 0.006, 0.001]),   # mean 0.00475
            uni.key(): torch.tensor([0.008, 0.003, 0.007, 0.002])}     # mean 0.0050: a gain well within the noise
    for c in (mixed, uni):
        c.measured = float(runs[c.key()].mean())
    pick, why = choose([mixed, uni], runs)
    assert pick is uni and "within 2 standard errors" in why
    runs[uni.key()] = runs[mixed.key()] + torch.tensor([0.004, 0.005, 0.004, 0.005])   # a consistent gain
    uni.measured = float(runs[uni.key()].mean())
    pick, why = choose([mixed, uni], runs)
    assert pick is mixed and "beats the best uniform" in why
