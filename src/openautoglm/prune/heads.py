"""Attention-head pruning: score heads, remove the least important ones physically, GQA-aware.

>>> pruner = HeadPruner(importance="taylor", ratio=0.25, scope="global")   # doctest: +SKIP
>>> result = pruner.prune(model, tokenizer)                                  # doctest: +SKIP

A query head is removed by cutting its rows of ``q_proj`` and its columns of ``o_proj`` (or their slices of a fused
``qkv_proj`` / GPT-2 ``c_attn``: ``_hf_attention``); a KV head (rows of ``k_proj``/``v_proj``, and its slot in the
KV cache) goes only when every query head that reads it is gone,
so the query-to-KV mapping is never broken. Layers may end with different head counts and uneven GQA groups
(see ``_hf.set_attention_layout``); the layout is recorded in the config (``prune_heads`` transform) and
rebuilt by the loader.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import _hf
from .._util import checks as C
from .._util.finite import check_weights
from ..hub import record_transform
from .importance import (
    METHODS,
    SCOPES,
    calibration_ids,
    check_method,
    head_mask_grads,
    head_scores,
    input_sq_norms,
    keep_masks,
)

log = logging.getLogger(__name__)

GRANULARITIES = ("head", "kv_group")


@dataclass
class HeadPruneConfig:
    """What to remove. Exactly one of ``ratio`` (fraction of query heads removed, in (0, 1)), ``num_heads``
    (query heads removed) or ``threshold`` (remove heads scoring below it); default ``ratio=0.25``.

    ``granularity="kv_group"`` removes whole GQA groups (a KV head with all its query heads), which also
    shrinks the KV cache; ``"head"`` removes single query heads. ``normalize`` divides each layer's scores by
    their L2 norm before global ranking (Michel et al. 2019).
    """

    importance: str = "taylor"
    ratio: float | None = None
    num_heads: int | None = None
    threshold: float | None = None
    scope: str = "global"
    granularity: str = "head"
    normalize: bool = True
    n_samples: int = 32
    seq_len: int = 256
    batch_size: int = 4  # calibration sequences per gradient (Michel et al. use 1: per-example |g|)
    seed: int = 0

    def __post_init__(self):
        check_method(self.importance, METHODS)
        if self.ratio is None and self.num_heads is None and self.threshold is None:
            self.ratio = 0.25
        if sum(v is not None for v in (self.ratio, self.num_heads, self.threshold)) != 1:
            raise ValueError("give exactly one of ratio, num_heads or threshold")
        self.ratio = C.number("ratio", self.ratio, min=0.0, max=1.0, min_open=True, max_open=True, optional=True)
        C.integer("num_heads", self.num_heads, min=1, optional=True)
        self.threshold = C.number("threshold", self.threshold, optional=True)
        C.choice("scope", self.scope, SCOPES)
        C.choice("granularity", self.granularity, GRANULARITIES)
        C.boolean("normalize", self.normalize)
        C.integer("n_samples", self.n_samples, min=1)
        C.integer("seq_len", self.seq_len, min=2)
        C.integer("batch_size", self.batch_size, min=1)
        C.integer("seed", self.seed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadPruneConfig:
        return cls(**d)


@dataclass
class HeadPruneResult:
    removed: dict[int, list[int]]  # layer -> original indices (at prune time) of removed query heads
    heads_before: list[tuple[int, int]]  # per layer (query heads, KV heads)
    heads_after: list[tuple[int, int]]
    params_before: int
    params_after: int
    attn_weight_bytes_before: int
    attn_weight_bytes_after: int
    kv_bytes_per_token_before: int  # K and V, all layers, one sequence, model dtype
    kv_bytes_per_token_after: int
    scores: list[list[float]] = field(default_factory=list)

    def attention_bytes(self, tokens: int, batch: int = 1) -> tuple[int, int]:
        """Attention weights + KV cache of ``tokens`` positions x ``batch``: (before, after)."""
        return (self.attn_weight_bytes_before + self.kv_bytes_per_token_before * tokens * batch,
                self.attn_weight_bytes_after + self.kv_bytes_per_token_after * tokens * batch)

    def to_dict(self) -> dict:
        return {**asdict(self), "removed": {str(k): v for k, v in self.removed.items()}}


def _layout_stats(model: nn.Module) -> tuple[list[tuple[int, int]], int, int]:
    heads, wbytes, kvb = [], 0, 0
    for _, attn in _hf.attention_modules(model):
        lay = _hf.attention_layout(attn)
        heads.append((len(lay), max(lay) + 1))
        projs = _hf.projection_modules(attn)
        wbytes += sum(p.numel() * p.element_size() for m in projs for p in m.parameters())
        kvb += 2 * (max(lay) + 1) * int(attn.head_dim) * next(projs[0].parameters()).element_size()
    return heads, wbytes, kvb


def remove_heads(model: nn.Module, heads: dict[int, list[int]], *, info: dict | None = None) -> list[list[int]]:
    """Physically remove query heads ``{layer: [head indices in the current layout]}``; returns the new
    per-layer KV index maps. A KV head goes when none of its query heads remains. Every layer keeps >= 1 head.
    The new layout (and ``info``) is recorded in ``model.config`` as a ``prune_heads`` transform.
    """
    attns = dict(_hf.attention_modules(model))
    for layer, hs in heads.items():
        if layer not in attns:
            raise ValueError(f"layer {layer} does not exist; the model has layers 0..{len(attns) - 1}")
        n_q = len(_hf.attention_layout(attns[layer]))
        bad = [h for h in hs if not 0 <= h < n_q]
        if bad:
            raise ValueError(f"layer {layer} has query heads 0..{n_q - 1}; cannot remove {bad}")
        if len(set(hs)) >= n_q:
            raise ValueError(f"cannot remove all {n_q} heads of layer {layer}; keep at least one")
    layouts = []
    for layer, attn in attns.items():
        lay = _hf.attention_layout(attn)
        drop = set(heads.get(layer, []))
        if drop:
            keep_q = [h for h in range(len(lay)) if h not in drop]
            keep_kv = sorted({lay[h] for h in keep_q})
            _hf.cut_heads(attn, keep_q, keep_kv)
            remap = {g: i for i, g in enumerate(keep_kv)}
            lay = [remap[lay[h]] for h in keep_q]
            _hf.set_attention_layout(attn, lay)
        layouts.append(lay)
    record_transform(model, "prune_heads", {"layers": layouts, **(info or {})})
    return layouts


def apply_head_layout(model: nn.Module, layouts: list[list[int]]) -> None:
    """Give an (empty or fresh) model the projection shapes of ``layouts`` (per-layer KV index maps)."""
    attns = list(_hf.attention_modules(model))
    if len(layouts) != len(attns):
        raise ValueError(f"head layout has {len(layouts)} layers, the model {len(attns)}")
    for (_, attn), lay in zip(attns, layouts):
        _hf.resize_heads(attn, len(lay), max(lay) + 1)
        _hf.set_attention_layout(attn, lay)


@contextlib.contextmanager
def mask_heads(model: nn.Module, heads: dict[int, list[int]]):
    """Zero the outputs of query heads ``{layer: [heads]}`` (at the ``o_proj`` input) inside the block."""
    handles = []
    for layer, attn in _hf.attention_modules(model):
        hs = heads.get(layer)
        if not hs:
            continue
        hd, n_q = int(attn.head_dim), len(_hf.attention_layout(attn))
        m = torch.ones(n_q)
        m[list(hs)] = 0

        def fn(mod, args, m=m, hd=hd):
            x = args[0]
            return ((x.reshape(*x.shape[:-1], -1, hd) * m.to(x)[:, None]).reshape(x.shape), *args[1:])

        handles.append(_hf.output_projection(attn).register_forward_pre_hook(fn))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


class HeadPruner:
    """Score attention heads and remove the least important ones in place (see :class:`HeadPruneConfig`)."""

    def __init__(self, config: HeadPruneConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise TypeError("pass a HeadPruneConfig or keyword arguments, not both")
        self.config = config if config is not None else HeadPruneConfig(**kwargs)

    def scores(self, model: nn.Module, tokenizer=None, *, calib_ids: torch.Tensor | None = None,
               text: str | None = None, progress: bool = True) -> list[torch.Tensor]:
        """Importance of each query head, one ``(n_heads_l,)`` tensor per layer."""
        c = self.config
        attns = [a for _, a in _hf.attention_modules(model)]
        stats: list[dict] = [{} for _ in attns]
        if c.importance != "magnitude":
            ids = calib_ids if calib_ids is not None else calibration_ids(
                tokenizer, text, n_samples=c.n_samples, seq_len=c.seq_len, seed=c.seed)
            if c.importance == "wanda":
                outs = {str(i): _hf.output_projection(a) for i, a in enumerate(attns)}
                norms = input_sq_norms(model, outs, ids, progress=progress)
                stats = [{"o_in_sq_norm": norms[str(i)]} for i in range(len(attns))]
            else:
                g_abs, g_sq = head_mask_grads(model, ids, batch_size=c.batch_size, progress=progress)
                stats = [{"mask_grad_abs": a, "mask_grad_sq": s} for a, s in zip(g_abs, g_sq)]
        return [head_scores(a, c.importance, **st).cpu() for a, st in zip(attns, stats)]

    def prune(self, model: nn.Module, tokenizer=None, *, calib_ids: torch.Tensor | None = None,
              text: str | None = None, scores: list[torch.Tensor] | None = None,
              progress: bool = True) -> HeadPruneResult:
        """Remove heads in place and record the new layout in ``model.config``; returns what was saved."""
        c = self.config
        names = {id(m): n for n, m in model.named_modules()}
        check_weights([(f"{names[id(a)]}.{cn}", ch) for _, a in _hf.attention_modules(model)
                       for cn, ch in a.named_children()], "head pruning")
        before, wb0, kv0 = _layout_stats(model)
        p0 = sum(p.numel() for p in model.parameters())
        total = sum(n for n, _ in before)
        if c.num_heads is not None and c.num_heads > total - len(before):
            raise ValueError(f"num_heads={c.num_heads} is more than can be removed: the model has {total} query "
                             f"heads in {len(before)} layers and each layer keeps at least one")
        if scores is None:
            scores = self.scores(model, tokenizer, calib_ids=calib_ids, text=text, progress=progress)
        removed = self._select(model, scores)
        remove_heads(model, removed, info={"config": c.to_dict()})
        after, wb1, kv1 = _layout_stats(model)
        res = HeadPruneResult(removed=removed, heads_before=before, heads_after=after, params_before=p0,
                              params_after=sum(p.numel() for p in model.parameters()), attn_weight_bytes_before=wb0,
                              attn_weight_bytes_after=wb1, kv_bytes_per_token_before=kv0,
                              kv_bytes_per_token_after=kv1, scores=[s.tolist() for s in scores])
        log.info("pruned %d of %d query heads (%d -> %d KV heads); attention weights %d -> %d bytes",
                 total - sum(n for n, _ in after), total, sum(k for _, k in before), sum(k for _, k in after), wb0, wb1)
        return res

    def _select(self, model: nn.Module, scores: list[torch.Tensor]) -> dict[int, list[int]]:
        c = self.config
        layouts = [_hf.attention_layout(a) for _, a in _hf.attention_modules(model)]
        if [len(s) for s in scores] != [len(lay) for lay in layouts]:
            raise ValueError("scores must have one entry per query head of each layer")
        if c.normalize and c.scope == "global" and c.threshold is None:
            scores = [s / s.norm().clamp_min(1e-12) for s in scores]
        if c.granularity == "kv_group":
            units = [torch.stack([s[torch.tensor(lay) == g].sum() for g in range(max(lay) + 1)])
                     for s, lay in zip(scores, layouts)]
            group_size = sum(len(lay) for lay in layouts) / sum(max(lay) + 1 for lay in layouts)
            count = None if c.num_heads is None else max(1, round(c.num_heads / group_size))
        else:
            units, count = scores, c.num_heads
        keep = keep_masks(units, ratio=c.ratio, count=count, threshold=c.threshold, scope=c.scope, min_keep=1)
        removed = {}
        for layer, (k, lay) in enumerate(zip(keep, layouts)):
            if c.granularity == "kv_group":
                k = k[torch.tensor(lay)]
            if not k.any():  # threshold or per-layer rounding removed everything: keep the best unit
                best = int(scores[layer].argmax())
                k = k.clone()
                k[best if c.granularity == "head" else torch.tensor(lay) == lay[best]] = True
            drop = [int(h) for h in torch.nonzero(~k).flatten()]
            if drop:
                removed[layer] = drop
        if not removed:
            raise ValueError(f"nothing to remove: no {c.granularity} falls below the criterion (ratio={c.ratio}, "
                             f"num_heads={c.num_heads}, threshold={c.threshold}, scope={c.scope})")
        return removed
