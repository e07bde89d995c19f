"""The head-pruning levels of the search: which query heads each removes (whole GQA groups).

Two families, each at the fractions of GQA groups asked for (``prune_ratios``):

* ``"taylor"`` -- the library's head pruner: a global ranking of the groups by Taylor importance, i.e. what
  ``HeadPruner(importance="taylor", granularity="kv_group", ratio=r)`` removes. The uniform recipes use these.
* ``"measured"`` -- per-layer costs measured on the calibration text: ``cost[l][k]``, the NLL increase when only
  layer ``l`` loses its ``k`` least important groups (Taylor order within the layer); then, for each level,
  the split of ``N = round(r * groups)`` over the layers with the least summed cost (exact dynamic programme).
  A first-order score can badly misjudge a layer: on the bundled model one group of layer 0 costs 0.95 nats
  alone, ten times any other layer's, yet the global Taylor ranking removes it at 37.5%.

Each level's own cost is then measured as a whole (its masks applied together), not summed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from .. import _hf
from ..prune.heads import HeadPruneConfig, HeadPruner, mask_heads

log = logging.getLogger(__name__)


def group_orders(model: nn.Module, scores: list[torch.Tensor]) -> list[list[list[int]]]:
    """Per layer, its GQA groups (each a list of query heads), least important (summed Taylor score) first."""
    out = []
    for (_, attn), s in zip(_hf.attention_modules(model), scores):
        lay = _hf.attention_layout(attn)
        groups = [[h for h, g in enumerate(lay) if g == kv] for kv in range(max(lay) + 1)]
        out.append(sorted(groups, key=lambda hs: float(s[hs].sum())))
    return out


def removal(orders: list[list[list[int]]], ks) -> dict[int, list[int]]:
    """``{layer: query heads}`` removing the first ``ks[l]`` groups of each layer's order."""
    return {layer: sorted(h for g in orders[layer][:k] for h in g) for layer, k in enumerate(ks) if k}


def allocate(costs: list[list[float]], n: int) -> list[int] | None:
    """``k`` per layer with ``sum(k) == n`` minimising ``sum(costs[l][k_l])`` (``costs[l][0] == 0``), or None."""
    inf = float("inf")
    best = {0: (0.0, [])}  # groups removed so far -> (cost, ks)
    for row in costs:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for done, (c, ks) in best.items():
            for k, ck in enumerate(row):
                if done + k > n:
                    break
                cand = (c + ck, ks + [k])
                if cand[0] < nxt.get(done + k, (inf,))[0]:
                    nxt[done + k] = cand
        best = nxt
    return best[n][1] if n in best else None


def taylor_scores(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    cfg = HeadPruneConfig(importance="taylor", ratio=0.5, granularity="kv_group", batch_size=batch_size)
    return HeadPruner(cfg).scores(model, calib_ids=windows, progress=False)


def taylor_levels(model: nn.Module, scores, ratios) -> dict[float, dict[int, list[int]]]:
    """What the library's head pruner removes at each ratio (global Taylor ranking, whole GQA groups)."""
    out = {}
    for r in ratios:
        try:
            out[r] = HeadPruner(HeadPruneConfig(importance="taylor", ratio=r, granularity="kv_group"))._select(model, scores)
        except ValueError as e:  # e.g. the ratio rounds to no group on a small model
            log.info("pruning ratio %s skipped: %s", r, e)
    return out


def max_groups_per_layer(orders, ratios) -> list[int]:
    """Groups per layer whose cost is measured: every layer keeps one; at most ``1.5 x`` the largest ratio."""
    top = max(ratios, default=0.0)
    return [min(len(o) - 1, math.ceil(1.5 * top * len(o) - 1e-9)) if top > 0 else 0 for o in orders]


def layer_costs(model: nn.Module, orders, max_k: list[int], run: Callable[[], float], base: float) -> list[list[float]]:
    """``cost[l][k]``: NLL increase with only layer ``l``'s ``k`` least important groups masked (``run()`` = NLL)."""
    costs = []
    for layer, kmax in enumerate(max_k):
        row = [0.0]
        for k in range(1, kmax + 1):
            with mask_heads(model, removal(orders, [0] * layer + [k])):
                row.append(run() - base)
        costs.append(row)
    return costs


def measured_levels(orders, costs, ratios) -> dict[float, dict[int, list[int]]]:
    """For each ratio, the split of its groups over the layers with the least summed measured cost."""
    total = sum(len(o) for o in orders)
    out = {}
    for r in ratios:
        ks = allocate(costs, round(r * total))
        if ks is None:
            log.info("pruning ratio %s: more groups than the measured per-layer costs cover; skipped", r)
        elif any(ks):
            out[r] = removal(orders, ks)
    return out
