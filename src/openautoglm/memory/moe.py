"""Mixture-of-experts accounting: parameters per token, the experts' share of the bytes, per-layer routing shape.

A token runs the router, the shared experts and ``k`` of the ``E`` routed experts of each MoE layer, so the
parameters it touches are ``total - sum over MoE layers of experts_params x (1 - k / E)`` (Mixtral-8x7B: 46.7B total,
12.9B active; Qwen3-30B-A3B: 30.5B, 3.3B). Counted from the modules (float transformers experts or
:class:`~openautoglm.quant.experts.QuantExperts`), so pruned experts and quantized ones count as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import _hf
from .._util.modules import model_bytes


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer: ``experts`` routed experts of width ``intermediate`` (``up_rows`` = 2I gated), ``top_k`` per
    token, ``params`` of all its routed experts (weights and biases), ``bytes`` as stored, shared-expert width."""

    index: int
    experts: int
    top_k: int
    intermediate: int
    up_rows: int
    params: int
    bytes: int
    shared_intermediate: int = 0


def experts_sizes(mod: nn.Module) -> tuple[int, int, int, int, int]:
    """(experts, hidden, intermediate, up rows, parameters) of a float or quantized experts module."""
    if _hf.moe.is_experts(mod):
        e, h, i = _hf.moe.sizes(mod)
        up = int(_hf.moe.weight_out_in(mod, "up").shape[1])
        return e, h, i, up, sum(p.numel() for p in mod.parameters())
    e, h, i, up = mod.num_experts, mod.hidden_dim, mod.intermediate_dim, mod.up_rows
    bias = sum(s.bias.numel() for s in (mod.gate_up, mod.down) if s.bias is not None)
    return e, h, i, up, e * (up * h + h * i) + bias


def experts_has_bias(mod: nn.Module) -> bool:
    """Per-expert biases (GPT-OSS), float or quantized experts."""
    if _hf.moe.is_experts(mod):
        return _hf.moe.bias(mod, "up") is not None
    return getattr(mod.gate_up, "bias", None) is not None


def _shared_width(block: nn.Module) -> int:
    shared = _hf.moe.shared_of(block)
    if shared is None:
        return 0
    gate = getattr(shared, "gate_proj", None)
    n = getattr(gate, "out_features", None)
    return int(n) if n is not None else 0


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` (empty for a dense model)."""
    out = []
    try:
        layers = _hf.decoder_layers(model)
    except TypeError:
        return out
    cfg = _hf.text_config(model.config) if hasattr(model, "config") else None
    for i, layer in enumerate(layers):
        block = _hf.moe.moe_block(layer)
        if block is None:
            continue
        e, _, inter, up, params = experts_sizes(block.experts)
        out.append(MoELayer(i, e, _hf.moe.top_k(block, cfg), inter, up, params, model_bytes(block.experts),
                            _shared_width(block)))
    return out


def active_parameters(total: int, layers: list[MoELayer]) -> int:
    """Parameters one token runs through: ``total`` less the routed experts it does not use in each layer."""
    return int(total - sum(L.params * (1 - min(L.top_k, L.experts) / L.experts) for L in layers))


def summary(model: nn.Module, total_params: int) -> dict | None:
    """``{"total", "active", "experts_params", "experts_bytes", "experts_share", "layers", "experts", "top_k"}`` for a
    MoE model (``total_params``: its logical parameter count), None for a dense one."""
    layers = moe_layers(model)
    if not layers:
        return None
    eb = sum(L.bytes for L in layers)
    return {"total": total_params, "active": active_parameters(total_params, layers),
            "experts_params": sum(L.params for L in layers), "experts_bytes": eb,
            "experts_share": eb / max(1, model_bytes(model)), "layers": len(layers),
            "experts": sorted({L.experts for L in layers}), "top_k": sorted({L.top_k for L in layers})}
