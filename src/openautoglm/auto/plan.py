"""From sensitivities to candidates: byte tables per pruning level, the knapsack optimum per level under the
budget, every uniform recipe and the trade-off curve -- no model weights needed (a meta-device model works),
so a recipe can be planned for a model that is not loaded (``benchmarks/auto_fit_gpu.py`` does)."""

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
         kv_residual: int, dtype: torch.dtype | None = None) -> Plan:
    """Candidates for ``budget`` bytes (see module docstring); raises :class:`BudgetError` when none fits."""
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    fit = int(budget * (1 - headroom))
    levels = []
    for r, removed in zip(sens.ratios, sens.removed):
        meta = meta_copy(model, dtype)
        if removed:
            remove_heads(meta, removed)
        levels.append(level_tables(meta, units, options, kv_options, ratio=r, removed=removed, batch=batch,
                                   context=context, group=kv_group, residual=kv_residual,
                                   cuda=device == "cuda"))
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
