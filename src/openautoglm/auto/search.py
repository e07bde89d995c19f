"""Combining the measured signals: an additive model of the NLL increase, solved as a knapsack.

The predicted increase of a candidate's mean NLL (nats/token; perplexity is ``exp`` of it) is the sum of the
increases measured when each of its choices was applied alone (:mod:`.sensitivity`): one per weight unit, one
per KV layer, one for the pruning level. Under a byte budget this is a *multiple-choice knapsack* (pick one
option per group, minimise the summed cost under the summed size), solved exactly by dynamic programming over
bytes rounded *up* to ``resolution`` steps, so a solution never exceeds the budget. The prefill workspace is a
maximum, not a sum: the solver is run once per workspace ceiling, allowing only choices below it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sensitivity import Sensitivities
from .space import LevelTables


@dataclass
class Candidate:
    """A point of the search: pruning level, weight option index per unit, KV option index per layer."""

    ratio: float                       # fraction of GQA groups pruned (display; ``level`` says which heads)
    weights: tuple[int, ...]
    kv: tuple[int, ...]
    bytes: int                         # budgeted terms, from the byte tables (= the estimator's total)
    predicted: float                   # predicted NLL increase (nats/token)
    kind: str = "auto"                 # "auto" (knapsack), "uniform", "local" (local-search neighbour)
    measured: float | None = None      # measured NLL increase on the calibration text, once verified
    label: str = ""
    terms: dict[str, int] = field(default_factory=dict)
    level: int = 0                     # index of the pruning level (``Sensitivities.ratios/removed/methods``)

    def key(self) -> tuple:
        return (self.level, self.weights, self.kv)


def candidate_bytes(t: LevelTables, w: tuple[int, ...], kv: tuple[int, ...], budget_terms) -> tuple[int, dict]:
    """Budgeted bytes of one candidate and its terms (the estimator's, at its peak moment)."""
    ws = [t.workspace[u][o] for u, o in enumerate(w)]
    ws_body = max([x for u, x in enumerate(ws) if u != t.head_unit] + [0])
    ws_head = ws[t.head_unit] if t.head_unit is not None else 0
    terms = t.peak_terms(t.other_weights + sum(t.weights[u][o] for u, o in enumerate(w)),
                         sum(t.kv[layer][b] for layer, b in enumerate(kv)), ws_body, ws_head)
    return sum(v for k, v in terms.items() if k in budget_terms), terms


def predicted_cost(s: Sensitivities, level: int, w: tuple[int, ...], kv: tuple[int, ...]) -> float:
    return (s.prune[level] + sum(s.weight[u][o] for u, o in enumerate(w))
            + sum(s.kv[layer][b] for layer, b in enumerate(kv)))


def mckp(costs: list[np.ndarray], sizes: list[np.ndarray], capacity: int, resolution: int = 2048):
    """Minimise ``sum(costs[g][choice[g]])`` with ``sum(sizes[g][choice[g]]) <= capacity``.

    Options with ``inf`` cost are not allowed. Returns ``(cost, choice)`` or ``(inf, None)`` when nothing fits,
    plus the table ``best[r]``: the least cost within ``base + r * step`` bytes (``base``, ``step`` returned)."""
    base = sum(int(np.min(np.where(np.isfinite(c), s, np.inf))) for c, s in zip(costs, sizes))
    room = capacity - base
    if room < 0:
        return np.inf, None, None, base, 1.0
    step = max(room / resolution, 1.0)
    R = int(room // step)
    dp = np.zeros(R + 1)
    picks = []
    for c, s in zip(costs, sizes):
        smin = int(np.min(np.where(np.isfinite(c), s, np.inf)))
        new = np.full(R + 1, np.inf)
        arg = np.full(R + 1, -1, dtype=np.int32)
        for o, (co, so) in enumerate(zip(c, s)):
            if not np.isfinite(co):
                continue
            k = int(np.ceil((so - smin) / step))
            if k > R:
                continue
            cand = np.full(R + 1, np.inf)
            cand[k:] = dp[: R + 1 - k] + co
            better = cand < new
            new[better], arg[better] = cand[better], o
        dp = new
        picks.append((arg, smin))
    if not np.isfinite(dp[R]):
        return np.inf, None, dp, base, step
    choice, r = [], R
    for (arg, smin), s in zip(reversed(picks), reversed(sizes)):
        o = int(arg[r])
        choice.append(o)
        r -= int(np.ceil((s[o] - smin) / step))
    return float(dp[R]), tuple(reversed(choice)), dp, base, step


def _ceilings(t: LevelTables, allowed_w: list[bool]) -> list[tuple[int, int]]:
    """(decoder-layer, lm_head) workspace ceilings to solve under: every value some allowed choice takes."""
    def values(units):
        return sorted({t.workspace[u][o] for u in units for o in range(len(allowed_w))
                       if allowed_w[o] and t.weights[u][o] is not None} | {0})

    dec = [u for u in range(len(t.weights)) if u != t.head_unit]
    head = values([t.head_unit]) if t.head_unit is not None else [0]
    return [(wb, wh) for wb in values(dec) for wh in head]


def solve_level(t: LevelTables, s: Sensitivities, budget: int, budget_terms, allowed_w: list[bool],
                resolution: int = 2048) -> Candidate | None:
    """The knapsack optimum at one pruning level (best over workspace ceilings), or None if nothing fits."""
    n_u, n_l = len(t.weights), len(t.kv)
    best = None
    for wb, wh in _ceilings(t, allowed_w):
        costs, sizes = [], []
        for u in range(n_u):
            cap = wh if u == t.head_unit else wb
            ok = [allowed_w[o] and t.weights[u][o] is not None and t.workspace[u][o] <= cap for o in range(len(allowed_w))]
            costs.append(np.array([s.weight[u][o] if ok[o] else np.inf for o in range(len(ok))]))
            size = [t.weights[u][o] if ok[o] and "weights" in budget_terms else 0 for o in range(len(ok))]
            sizes.append(np.array(size, dtype=np.int64))
        for layer in range(n_l):
            costs.append(np.array(s.kv[layer], dtype=float))
            sizes.append(np.array(t.kv[layer] if "kv_cache" in budget_terms else [0] * len(t.kv[layer]), dtype=np.int64))
        rest = t.peak_terms(t.other_weights, 0, wb, wh)  # an upper bound: the choices' transients are <= the ceilings
        fixed = sum(v for k, v in rest.items() if k in budget_terms)
        cost, choice, *_ = mckp(costs, sizes, budget - fixed, resolution)
        if choice is None:
            continue
        w, kv = tuple(choice[:n_u]), tuple(choice[n_u:])
        b, terms = candidate_bytes(t, w, kv, budget_terms)
        c = Candidate(t.ratio, w, kv, b, cost + s.prune[t.level], terms=terms, level=t.level)
        if b <= budget and (best is None or c.predicted < best.predicted):
            best = c
    return best


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (memory, cost) not dominated by another (less or equal on both, less on one)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], np.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def smallest(levels: list[LevelTables], s: Sensitivities, budget_terms, allowed_w: list[bool]) -> Candidate:
    """The candidate needing the least memory (ties: the least predicted cost)."""
    best = None
    for t in levels:
        for wb, wh in _ceilings(t, allowed_w):
            w = []
            for u in range(len(t.weights)):
                cap = wh if u == t.head_unit else wb
                ok = [o for o in range(len(allowed_w)) if allowed_w[o] and t.weights[u][o] is not None
                      and t.workspace[u][o] <= cap]
                w.append(min(ok, key=lambda o: (t.weights[u][o] if "weights" in budget_terms else 0, s.weight[u][o])))
            kv = tuple(min(range(len(t.kv[layer])), key=lambda b: (t.kv[layer][b] if "kv_cache" in budget_terms else 0,
                                                                    s.kv[layer][b])) for layer in range(len(t.kv)))
            b, terms = candidate_bytes(t, tuple(w), kv, budget_terms)
            c = Candidate(t.ratio, tuple(w), kv, b, predicted_cost(s, t.level, tuple(w), kv), "smallest", terms=terms,
                          level=t.level)
            if best is None or (c.bytes, c.predicted) < (best.bytes, best.predicted):
                best = c
    return best


def uniform_candidates(levels: list[LevelTables], s: Sensitivities, option_names: list[str], kv_names: list[str],
                       budget_terms) -> list[Candidate]:
    """Every single uniform recipe: one weight option for all units (units it cannot apply to stay in the model
    dtype), one KV width for all layers, one pruning level of the library's head pruner (global Taylor ranking)."""
    keep = option_names.index("bf16")
    out = []
    for t in levels:
        if t.method == "measured":
            continue
        for o, oname in enumerate(option_names):
            w = tuple(o if t.weights[u][o] is not None else keep for u in range(len(t.weights)))
            for b, bname in enumerate(kv_names):
                kv = (b,) * len(t.kv)
                size, terms = candidate_bytes(t, w, kv, budget_terms)
                out.append(Candidate(t.ratio, w, kv, size, predicted_cost(s, t.level, w, kv), "uniform",
                                     label=f"{oname} + KV {bname} + prune {t.ratio:g}", terms=terms, level=t.level))
    return out


def front_candidates(levels: list[LevelTables], s: Sensitivities, budget_terms, allowed_w: list[bool],
                     lo: int, hi: int, n: int = 24) -> list[Candidate]:
    """Knapsack optima for ``n`` budgets between ``lo`` and ``hi`` (the trade-off curve of the search)."""
    seen, out = set(), []
    for B in np.linspace(lo, hi, n):
        for t in levels:
            c = solve_level(t, s, int(B), budget_terms, allowed_w)
            if c is not None and c.key() not in seen:
                seen.add(c.key())
                c.kind = "front"
                out.append(c)
    return out
