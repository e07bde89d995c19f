"""Expert pruning: drop the experts of each MoE layer that calibration text routes to least.

The routers of every MoE layer are watched while the model runs calibration windows (:func:`expert_usage`: how often
each expert is among a token's top-k, or the routing weight it receives); each layer keeps its most used experts
(:func:`remove_experts`): their weights (float or quantized, :meth:`~openautoglm.quant.experts.QuantExperts.keep_experts`)
and the router's rows for them, so the router scores only the experts left -- a softmax router renormalizes over them,
as if the dropped experts' logits were -inf. The result is recorded as a ``prune_experts`` transform (the kept
experts of each layer), so a saved model reloads with its new shapes, before or after quantization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _hf
from .._util import checks as C
from .._util.modules import model_bytes
from ..hub import record_transform

log = logging.getLogger(__name__)
TRANSFORM = "prune_experts"
IMPORTANCE = ("count", "weight")


@dataclass
class ExpertPruneConfig:
    """``ratio``: fraction of each MoE layer's routed experts removed (or ``keep``: experts kept per layer);
    ``importance``: ``"count"`` (times among a token's top-k) or ``"weight"`` (routing weight received)."""

    ratio: float | None = None
    keep: int | None = None
    importance: str = "count"
    batch_size: int = 4

    def __post_init__(self) -> None:
        self.ratio = C.number("ratio", self.ratio, min=0.0, max=1.0, max_open=True, optional=True)
        self.keep = C.integer("keep", self.keep, min=1, optional=True)
        if (self.ratio is None) == (self.keep is None):
            raise ValueError("pass exactly one of ratio= (fraction of experts removed) or keep= (experts kept)")
        C.choice("importance", self.importance, IMPORTANCE)
        C.integer("batch_size", self.batch_size, min=1)

    def kept(self, experts: int, top_k: int) -> int:
        n = self.keep if self.keep is not None else experts - int(round(self.ratio * experts))
        return max(top_k, min(experts, n))


@dataclass
class ExpertPruneResult:
    kept: dict[int, list[int]]
    usage: dict[int, list[float]]
    experts_before: dict[int, int]
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list[str] = field(default_factory=list)


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    return {i: b for i, layer in enumerate(_hf.decoder_layers(model)) if (b := _hf.moe.moe_block(layer)) is not None}


@torch.no_grad()
def expert_usage(model: nn.Module, calib_ids: torch.Tensor, importance: str = "count", batch_size: int = 4
                 ) -> dict[int, torch.Tensor]:
    """``{layer: (experts,) float}``: how often calibration tokens ``calib_ids (n, seq)`` pick each expert (or the
    routing weight they give it), from forward hooks on the routers (removed afterwards)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no mixture-of-experts layers")
    usage: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in blocks.items():
        router = _hf.moe.router_of(block)
        n = block.experts.num_experts

        def hook(_m, _args, out, i=i, n=n):
            idx = _hf.moe.router_indices(out)
            if idx is None:
                return
            w = _hf.moe.router_weights(out) if importance == "weight" else None
            vals = torch.ones_like(idx, dtype=torch.float32) if w is None else w.float()
            acc = usage.setdefault(i, torch.zeros(n, dtype=torch.float32, device=idx.device))
            acc.index_add_(0, idx.reshape(-1), vals.reshape(-1))

        handles.append(router.register_forward_hook(hook))
    dev = next(model.parameters()).device
    try:
        for b in range(0, calib_ids.shape[0], batch_size):
            model(input_ids=calib_ids[b:b + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(blocks) - set(usage))
    if missing:
        raise TypeError(f"the routers of layers {missing} did not report their top-k choice (transformers 5 routers "
                        "return (logits, weights, indices))")
    return {i: u.cpu() for i, u in usage.items()}


@torch.no_grad()
def remove_experts(model: nn.Module, keep: dict[int, list[int]], *, info: dict | None = None) -> None:
    """Keep experts ``keep[layer]`` of each listed MoE layer (float or quantized experts) and the router rows for
    them; records the ``prune_experts`` transform."""
    blocks = moe_blocks(model)
    for i, kept in keep.items():
        if i not in blocks:
            raise ValueError(f"layer {i} has no routed experts; MoE layers: {sorted(blocks)}")
        n = blocks[i].experts.num_experts
        if not kept or len(set(kept)) != len(kept) or not all(0 <= e < n for e in kept):
            raise ValueError(f"layer {i}: keep {kept} must be distinct experts of 0..{n - 1}")
    for i, kept in keep.items():
        _apply(blocks[i], sorted(kept), _hf.text_config(model.config))
    record_transform(model, TRANSFORM, {"layers": {str(i): sorted(k) for i, k in sorted(keep.items())}, **(info or {})})


def _apply(block: nn.Module, kept: list[int], config) -> None:
    _hf.moe.keep_router_rows(_hf.moe.router_of(block), kept, config)
    experts = block.experts
    if _hf.moe.is_experts(experts):
        _hf.moe.keep_experts(experts, kept)
    elif hasattr(experts, "keep_experts"):  # openautoglm's quantized experts
        experts.keep_experts(kept)
    else:
        raise TypeError(f"cannot prune experts of {type(experts).__name__}")


def prune_experts(model: nn.Module, config: ExpertPruneConfig | None = None, *, calib_ids: torch.Tensor,
                  **kwargs) -> ExpertPruneResult:
    """Drop the least used experts of every MoE layer in place (see the module docstring); ``calib_ids (n, seq)``
    token windows (:func:`openautoglm.prune.calibration_ids`)."""
    if config is not None and kwargs:
        raise TypeError("pass an ExpertPruneConfig or keyword arguments, not both")
    config = config if config is not None else ExpertPruneConfig(**kwargs)
    before = model_bytes(model)
    usage = expert_usage(model, calib_ids, config.importance, config.batch_size)
    blocks = moe_blocks(model)
    keep, sizes = {}, {}
    for i, u in usage.items():
        n = u.numel()
        k = _hf.moe.top_k(blocks[i], _hf.text_config(model.config))
        order = torch.argsort(u, descending=True, stable=True).tolist()
        keep[i] = sorted(order[:config.kept(n, k)])
        sizes[i] = n
    remove_experts(model, keep, info={"importance": config.importance})
    res = ExpertPruneResult(keep, {i: u.tolist() for i, u in usage.items()}, sizes, before, model_bytes(model))
    log.info("kept %s of %s experts per MoE layer: %.1f MiB -> %.1f MiB", sorted({len(k) for k in keep.values()}),
             sorted(set(sizes.values())), before / 2**20, res.bytes_after / 2**20)
    return res


def rebuild(model: nn.Module, spec: dict) -> None:
    """Give an empty (meta) model the recorded experts of each layer."""
    blocks = moe_blocks(model)
    for i, kept in spec["layers"].items():
        _apply(blocks[int(i)], list(kept), _hf.text_config(model.config))
