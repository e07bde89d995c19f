"""Pruning: attention heads (physical, GQA-aware), mixture-of-experts experts (least routed), unstructured / 2:4
sparsity, low-rank projections, and a recovery fine-tune. Importing this package registers the loader's rebuilders for the transforms it records,
so pruned checkpoints reload with the right shapes.
"""

from __future__ import annotations

from ..hub import register_rebuilder
from . import experts as _experts
from .api import PruneRecipe, apply_pruning
from .experts import ExpertPruneConfig, ExpertPruneResult, expert_usage, prune_experts, remove_experts
from .heads import HeadPruneConfig, HeadPruner, HeadPruneResult, apply_head_layout, mask_heads, remove_heads
from .importance import METHODS, calibration_ids, keep_masks, weight_scores
from .lowrank import LowRankConfig, LowRankLinear, LowRankResult, low_rank, rebuild_low_rank
from .recovery import RecoveryConfig, RecoveryResult, recover
from .sparsity import SparsityConfig, SparsityResult, check_nm, nm_mask, sparsify


@register_rebuilder("prune_heads")
def _rebuild_heads(model, spec: dict) -> None:
    apply_head_layout(model, spec["layers"])


@register_rebuilder("prune_experts")
def _rebuild_experts(model, spec: dict) -> None:
    _experts.rebuild(model, spec)


@register_rebuilder("low_rank")
def _rebuild_low_rank(model, spec: dict) -> None:
    rebuild_low_rank(model, spec)


@register_rebuilder("sparsity")
def _rebuild_sparsity(model, spec: dict) -> None:
    """Zeroed weights keep their dense shapes: nothing to rebuild."""


__all__ = [
    "PruneRecipe", "apply_pruning",
    "HeadPruner", "HeadPruneConfig", "HeadPruneResult", "remove_heads", "apply_head_layout", "mask_heads",
    "ExpertPruneConfig", "ExpertPruneResult", "expert_usage", "prune_experts", "remove_experts",
    "METHODS", "calibration_ids", "keep_masks", "weight_scores",
    "SparsityConfig", "SparsityResult", "sparsify", "nm_mask", "check_nm",
    "LowRankConfig", "LowRankLinear", "LowRankResult", "low_rank",
    "RecoveryConfig", "RecoveryResult", "recover",
]
