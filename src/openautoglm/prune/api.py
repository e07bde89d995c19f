"""One call for a pruning recipe (what ``openautoglm compress --prune-heads ... --sparsity ... --low-rank ...`` runs).

Order: head pruning (needs plain Linear projections), expert pruning, then low-rank factorization, then sparsity (which may
sparsify the low-rank factors); quantization, if any, comes after all of them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._util import checks as C
from .experts import ExpertPruneConfig, prune_experts
from .heads import HeadPruneConfig, HeadPruner
from .importance import calibration_ids
from .lowrank import LowRankConfig, low_rank
from .sparsity import SparsityConfig, sparsify

log = logging.getLogger(__name__)


@dataclass
class PruneRecipe:
    """``prune_heads``: fraction of query heads removed; ``prune_experts``: fraction of each MoE layer's routed
    experts removed (the least routed on the calibration text); ``sparsity``: fraction of weights zeroed (a ``2:4``
    pattern implies 0.5); ``low_rank``: energy kept by the low-rank factorization. ``None`` skips a step."""

    prune_heads: float | None = None
    head_importance: str = "taylor"
    head_granularity: str = "head"
    prune_experts: float | None = None
    expert_importance: str = "count"
    sparsity: float | None = None
    sparsity_method: str = "wanda"
    sparsity_pattern: str = "unstructured"
    low_rank: float | None = None
    low_rank_method: str = "activation"
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        # the recipe's own names first (a CLI user wrote --prune-heads, not ratio=), then each step's config once,
        # so bad values fail here, before any model is loaded
        self.prune_heads = C.number("prune_heads", self.prune_heads, min=0.0, max=1.0, min_open=True, max_open=True,
                                    optional=True)
        self.prune_experts = C.number("prune_experts", self.prune_experts, min=0.0, max=1.0, min_open=True,
                                      max_open=True, optional=True)
        self.sparsity = C.number("sparsity", self.sparsity, min=0.0, max=1.0, min_open=True, max_open=True,
                                 optional=True)
        self.low_rank = C.number("low_rank", self.low_rank, min=0.0, max=1.0, min_open=True, optional=True)
        C.integer("n_samples", self.n_samples, min=1)
        C.integer("seq_len", self.seq_len, min=2)
        C.integer("seed", self.seed)
        self.head_config(), self.sparsity_config(), self.low_rank_config(), self.expert_config()

    @property
    def empty(self) -> bool:
        return (self.prune_heads is None and self.prune_experts is None and self.sparsity_config() is None
                and self.low_rank is None)

    def expert_config(self) -> ExpertPruneConfig | None:
        if self.prune_experts is None:
            return None
        return ExpertPruneConfig(ratio=self.prune_experts, importance=self.expert_importance)

    def head_config(self) -> HeadPruneConfig | None:
        if self.prune_heads is None:
            return None
        return HeadPruneConfig(importance=self.head_importance, ratio=self.prune_heads, scope="global",
                               granularity=self.head_granularity, n_samples=self.n_samples, seq_len=self.seq_len)

    def sparsity_config(self) -> SparsityConfig | None:
        if self.sparsity is None and self.sparsity_pattern == "unstructured":
            return None
        kw = {} if self.sparsity is None else {"sparsity": self.sparsity}
        return SparsityConfig(method=self.sparsity_method, pattern=self.sparsity_pattern, n_samples=self.n_samples,
                              seq_len=self.seq_len, **kw)

    def low_rank_config(self) -> LowRankConfig | None:
        if self.low_rank is None:
            return None
        return LowRankConfig(energy=self.low_rank, method=self.low_rank_method, n_samples=self.n_samples,
                             seq_len=self.seq_len)

    def to_dict(self) -> dict:
        return asdict(self)


def apply_pruning(model: nn.Module, recipe: PruneRecipe, tokenizer=None, *, text: str | None = None,
                  progress: bool = True) -> dict:
    """Apply ``recipe`` in place; returns ``{"heads": HeadPruneResult, "low_rank": ..., "sparsity": ...}``."""
    out: dict = {}
    if recipe.empty:
        return out
    calib = None
    needs_data = (recipe.prune_heads is not None and recipe.head_importance != "magnitude") or \
        recipe.prune_experts is not None or \
        (recipe.sparsity_config() is not None and recipe.sparsity_method != "magnitude") or \
        (recipe.low_rank is not None and recipe.low_rank_method == "activation")
    if needs_data:
        calib = calibration_ids(tokenizer, text, n_samples=recipe.n_samples, seq_len=recipe.seq_len, seed=recipe.seed)
    p0 = sum(p.numel() for p in model.parameters())
    if recipe.head_config() is not None:
        out["heads"] = HeadPruner(recipe.head_config()).prune(model, calib_ids=calib, progress=progress)
    if recipe.expert_config() is not None:
        out["experts"] = prune_experts(model, recipe.expert_config(), calib_ids=calib)
    if recipe.low_rank_config() is not None:
        out["low_rank"] = low_rank(model, recipe.low_rank_config(), calib_ids=calib, progress=progress)
    if recipe.sparsity_config() is not None:
        with torch.no_grad():
            out["sparsity"] = sparsify(model, recipe.sparsity_config(), calib_ids=calib, progress=progress)
    log.info("pruning: %d -> %d parameters", p0, sum(p.numel() for p in model.parameters()))
    return out
