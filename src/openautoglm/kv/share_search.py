"""Calibrated cross-layer KV sharing: which layers can attend to an earlier layer's cache for free?

KVSharer (Yang et al., 2024, "KVSharer: Efficient Inference via Layer-Wise Dissimilar KV Cache
Sharing") found that letting a layer reuse the KV cache of a *dissimilar* earlier layer often costs
less than sharing between similar (adjacent) layers, the MiniCache premise. Rather than trusting a
similarity proxy, the search here measures: a layer ``d`` reading layer ``s``'s keys and values is
exactly one teacher-forced forward with a cache whose layer ``d`` returns layer ``s``'s entries, so each
candidate plan is scored by its mean token loss on calibration text (not the evaluation text).

* ``strategy="greedy"``: add, one pair at a time, the pair whose plan has the lowest calibration loss
  (candidates: every ``(s, d)``, ``s < d``, or the ``max_candidates`` most dissimilar ones).
* ``strategy="kvsharer"``: KVSharer's order - pairs from the most to the least dissimilar (Euclidean
  distance between the layers' mean keys and values) - each kept if the calibration loss stays within
  ``tolerance`` of the unshared model's.

Every shared layer saves one layer's cache: ``n_shared / n_layers`` of the KV bytes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import _hf
from .._util.modules import model_device
from .quantized import QuantizedKVCache

log = logging.getLogger(__name__)


@dataclass
class SharingPlan:
    """Result of :func:`search_sharing`: ``pairs`` are ``(source, layer)``; losses are mean token NLL."""

    pairs: list[tuple[int, int]]
    n_layers: int
    strategy: str
    base_loss: float
    losses: list[float] = field(default_factory=list)  # calibration loss after each accepted pair
    evaluations: int = 0

    @property
    def saved_fraction(self) -> float:
        return len(self.pairs) / self.n_layers

    def to_dict(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "n_layers": self.n_layers, "strategy": self.strategy,
                "saved_fraction": self.saved_fraction, "base_loss": self.base_loss, "losses": self.losses,
                "calibration_ppl_increase_pct": [100 * (math.exp(x - self.base_loss) - 1) for x in self.losses],
                "evaluations": self.evaluations}


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, share: dict[int, int]) -> float:
    """Mean next-token NLL of ``windows`` (n, seq) with layers ``share`` (layer -> source) reading their source's KV."""
    dev = model_device(model)
    nll, count = 0.0, 0
    for w in windows:
        x = w.view(1, -1).to(dev)
        cache = QuantizedKVCache(None, config=model.config, share=share) if share else None
        if cache is None:
            logits = model(input_ids=x).logits
        else:
            logits = _hf.forward_with_cache(model, x, cache).logits
        nll += F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    return nll / count


@torch.no_grad()
def layer_kv_means(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """(n_layers, 2 * kv_heads * head_dim): every layer's mean key and value over the calibration tokens."""
    from transformers import DynamicCache

    dev = model_device(model)
    sums = None
    for w in windows:
        cache = DynamicCache(config=model.config)
        _hf.forward_with_cache(model, w.view(1, -1).to(dev), cache)
        rows = []
        for layer in cache.layers:
            k, v = layer.keys.float(), layer.values.float()  # (1, h, n, d)
            rows.append(torch.cat([k.mean(2).flatten(), v.mean(2).flatten()]))
        m = torch.stack(rows)
        sums = m if sums is None else sums + m
    return sums / len(windows)


def _valid(pairs: list[tuple[int, int]], s: int, d: int) -> bool:
    dsts = {p[1] for p in pairs}
    srcs = {p[0] for p in pairs}
    return d not in dsts and d not in srcs and s not in dsts


def search_sharing(
    model: nn.Module,
    token_ids: torch.Tensor,
    n_shared: int,
    *,
    strategy: str = "greedy",
    seq_len: int = 512,
    n_windows: int = 4,
    max_candidates: int | None = None,
    tolerance: float = 0.02,
    progress: bool = True,
) -> SharingPlan:
    """Choose ``n_shared`` layers that will read an earlier layer's KV cache instead of keeping their own.

    Parameters
    ----------
    model : a causal LM (Llama-family attention)
    token_ids : (n_tokens,) calibration tokens (keep them apart from the text you evaluate on)
    n_shared : layers to share (``n_shared / n_layers`` of the KV cache is saved)
    strategy : ``"greedy"`` (lowest measured loss first) or ``"kvsharer"`` (most dissimilar first,
        kept while the loss stays within ``tolerance``; may return fewer pairs)
    seq_len, n_windows : calibration windows (``n_windows`` x ``seq_len`` tokens)
    max_candidates : greedy: only the most dissimilar pairs are scored (default: all)
    """
    n_layers = _hf.num_layers(model.config)
    if strategy not in ("greedy", "kvsharer"):
        raise ValueError(f"strategy={strategy!r}; use 'greedy' or 'kvsharer'")
    if not isinstance(n_shared, int) or not 0 <= n_shared < n_layers:
        raise ValueError(f"n_shared={n_shared!r} must be an integer in [0, {n_layers - 1}]")
    need = seq_len * n_windows
    if token_ids.numel() < need:
        raise ValueError(f"need {need} calibration tokens ({n_windows} windows of {seq_len}); got {token_ids.numel()}")
    windows = token_ids[:need].view(n_windows, seq_len)
    base = calibration_loss(model, windows, {})
    means = layer_kv_means(model, windows)
    dist = torch.cdist(means, means)
    order = sorted(((s, d) for d in range(n_layers) for s in range(d)), key=lambda p: -float(dist[p[0], p[1]]))
    plan = SharingPlan([], n_layers, strategy, base)
    bar = tqdm(total=n_shared, desc=f"kv sharing search [{strategy}]", disable=not progress)
    if strategy == "kvsharer":
        for s, d in order:
            if len(plan.pairs) == n_shared:
                break
            if not _valid(plan.pairs, s, d):
                continue
            loss = calibration_loss(model, windows, {dd: ss for ss, dd in plan.pairs + [(s, d)]})
            plan.evaluations += 1
            if math.exp(loss - base) - 1 <= tolerance:
                plan.pairs.append((s, d))
                plan.losses.append(loss)
                bar.update()
    else:
        cands = order[:max_candidates] if max_candidates else order
        while len(plan.pairs) < n_shared:
            best = None
            for s, d in cands:
                if not _valid(plan.pairs, s, d):
                    continue
                loss = calibration_loss(model, windows, {dd: ss for ss, dd in plan.pairs + [(s, d)]})
                plan.evaluations += 1
                if best is None or loss < best[0]:
                    best = (loss, s, d)
            if best is None:
                log.warning("no valid layer pair left after %d shared layers", len(plan.pairs))
                break
            plan.pairs.append((best[1], best[2]))
            plan.losses.append(best[0])
            bar.update()
    bar.close()
    log.info("kv sharing [%s]: %s, calibration loss %.4f -> %s", strategy, plan.pairs, base, plan.losses)
    return plan
