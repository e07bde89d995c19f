"""From sensitivities to candidates: byte tables per pruning level, the knapsack optimum per level under the
budget, every uniform recipe and the trade-off curve -- no model weights needed (a meta-device model works),
so a recipe can be planned for a model that is not loaded (``benchmarks/auto/fit_gpu.py`` does)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..memory.mixed import meta_copy
from ..prune.heads import remove_heads
from . import search
from .budget import BudgetError, fmt_bytes
from .sensitivity import Sensitivities
from .space import LevelTables, Unit, WeightOption, level_tables


@dataclass
class Plan:
    fit: int                           # bytes the candidates must fit (budget less headroom)
    levels: list[LevelTables]
    auto: list[search.Candidate]       # knapsack optimum per pruning level
    uniform: list[search.Candidate]
    front: list[search.Candidate]
    smallest: search.Candidate


def kv_name(b) -> str:
    return "bf16" if b is None else f"int{b}"


def plan(model: nn.Module, sens: Sensitivities, units: list[Unit], options: list[WeightOption], kv_options: list,
         budget: int, *, context: int, batch: int, terms, headroom: float, device: str, kv_group: int,
         kv_residual: int | str, dtype: torch.dtype | None = None) -> Plan:
    """Candidates for ``budget`` bytes (see module docstring); raises :class:`BudgetError` when none fits."""
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    fit = int(budget * (1 - headroom))
    levels = []
    for i, (r, removed) in enumerate(zip(sens.ratios, sens.removed)):
        meta = meta_copy(model, dtype)
        if removed:
            remove_heads(meta, removed)
        method = sens.method(i)
        levels.append(level_tables(meta, units, options, kv_options, ratio=r, removed=removed, batch=batch,
                                   context=context, group=kv_group, residual=kv_residual,
                                   cuda=device == "cuda", level=i, method=method))
    allowed = [True] * len(options)
    smallest = search.smallest(levels, sens, terms, allowed)
    auto = [c for c in (search.solve_level(t, sens, fit, terms, allowed) for t in levels) if c is not None]
    if not auto:
        base = math.exp(sens.base_nll)
        need = math.ceil(smallest.bytes / (1 - headroom))
        ppl = base * math.exp(smallest.predicted)
        raise BudgetError(
            f"nothing fits in {fmt_bytes(budget)} at batch {batch} x context {context}: the smallest recipe of "
            f"the search space needs {fmt_bytes(need)} ({fmt_bytes(smallest.bytes)} estimated + {100 * headroom:g}% "
            f"headroom; estimated perplexity {base:.2f} -> {ppl:.2f}, {100 * math.expm1(smallest.predicted):+.1f}%); "
            "raise the budget or lower the batch or context", need, ppl)
    uniform = search.uniform_candidates(levels, sens, [o.name for o in options], [kv_name(b) for b in kv_options], terms)
    front = search.front_candidates(levels, sens, terms, allowed, smallest.bytes, max(c.bytes for c in uniform))
    return Plan(fit, levels, auto, uniform, front, smallest)


def shortlist(p: Plan, sens: Sensitivities, terms, n_auto: int = 3, n_uniform: int = 2,
              tighter=(0.98, 0.95, 0.9)) -> list[search.Candidate]:
    """The candidates to verify together: the ``n_auto`` best-predicted mixed recipes -- each pruning level's
    knapsack optimum, and at the best levels the optima for budgets a little tighter (near-equal alternatives,
    in case the additive model misjudges the pick's combination) -- and the ``n_uniform`` best-predicted
    uniform recipes that fit (so the pick is never worse on the verification text than the best of them)."""
    allowed = [True] * len(p.levels[0].weights[0]) if p.levels else []
    pool = {c.key(): c for c in p.auto}
    for c in sorted(p.auto, key=lambda c: c.predicted)[:2]:
        t = p.levels[c.level]
        for f in tighter:
            alt = search.solve_level(t, sens, int(p.fit * f), terms, allowed)
            if alt is not None and alt.key() not in pool:
                alt.kind = "alternative"
                pool[alt.key()] = alt
    auto = sorted(pool.values(), key=lambda c: c.predicted)[:n_auto]
    fitting = sorted((c for c in p.uniform if c.bytes <= p.fit), key=lambda c: c.predicted)
    return auto + [c for c in fitting if c.key() not in pool][:n_uniform]


def choose(shortlist: list[search.Candidate], per_window: dict, margin: float = 2.0) -> tuple[search.Candidate, str]:
    """The pick among verified candidates, and why.

    ``per_window[c.key()]``: each verification window's NLL increase, shape ``(n,)``. The lowest mean wins, except
    that a mixed recipe must beat the best verified uniform recipe by more than ``margin`` standard errors of
    their paired per-window difference: a gain the verification cannot tell from noise does not justify a
    per-layer recipe over a uniform one (and the additive model's errors go the other way as often)."""
    best = min(shortlist, key=lambda c: (c.measured, c.bytes))
    uniform = [c for c in shortlist if c.kind == "uniform"]
    if best.kind == "uniform" or not uniform:
        return best, f"lowest verified NLL ({best.measured:+.5f} nats)"
    u = min(uniform, key=lambda c: (c.measured, c.bytes))
    d = per_window[u.key()] - per_window[best.key()]
    n = d.numel()
    se = float(d.std(unbiased=True)) / n**0.5 if n > 1 else 0.0
    gain = float(d.mean())
    if gain > margin * se:
        return best, (f"beats the best uniform recipe ({u.label}) by {gain:.5f} nats, more than {margin:g} standard "
                      f"errors ({se:.5f}) of the paired difference over {n} verification windows")
    return u, (f"the best mixed recipe beat the best uniform one ({u.label}) by {gain:+.5f} nats, within {margin:g} "
               f"standard errors ({se:.5f}) over {n} verification windows: the uniform recipe is kept")
