"""Fused quantized-KV attention inside transformers models.

``enable_fused_attention(model)`` registers one attention function (``"openautoglm_kv"``) with
transformers and switches the model to it. For every layer whose cache slot is an openautoglm
quantized store and whose step has one query token, the cache's ``update`` stores the token and leaves
the store here (``set_pending``); the attention function then runs
:func:`~openautoglm.kv.kernels.ops.decode_attention` on the quantized store directly, instead of attending to
dequantized copies. Every other call (prefill chunks, other caches, other layers) goes to the attention
function the model used before (sdpa or eager), unchanged. With the fused function not enabled, the
caches return dequantized keys and values and any attention function works.

The hand-over is a per-layer slot written by ``update`` and read right after by the attention call of
the same layer (one thread); dynamo traces it like any Python side effect, so a compiled decode step
captures the fused op.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import _hf

log = logging.getLogger(__name__)

FUSED = "openautoglm_kv"
_BASE_ATTR = "_openautoglm_kv_base_attention"
_PENDING: dict[int, object] = {}


def set_pending(layer_idx: int, store) -> None:
    _PENDING[layer_idx] = store


def fused_enabled(config) -> bool:
    """True when ``config``'s model runs the fused attention function (so caches may hand stores over)."""
    return config is not None and _hf.attention_implementation_of(config) == FUSED


def _mask_2d(mask: torch.Tensor | None, length_hint: int | None = None) -> torch.Tensor | None:
    """transformers' 4D mask (batch, 1, q=1, kv) -> (batch, kv) bool, True = attend."""
    if mask is None:
        return None
    m = mask[:, 0, -1, :]
    return m if m.dtype == torch.bool else m == 0


def _fused_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    store = _PENDING.pop(getattr(module, "layer_idx", -1), None)
    if store is not None and query.shape[2] == 1:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return store.decode(query, _mask_2d(attention_mask), scale), None
    base = getattr(module.config, _BASE_ATTR, None) or "sdpa"
    fn = _hf.attention_function(base)
    if base == "eager" and attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def enable_fused_attention(model: nn.Module) -> nn.Module:
    """Let ``model`` read openautoglm's quantized KV caches directly at decode (in place; idempotent).

    The previous attention implementation (sdpa or eager) still serves everything else. Returns ``model``.
    """
    current = _hf.attention_implementation(model)
    if current == FUSED:
        return model
    if current not in ("sdpa", "eager"):
        log.warning("fused KV attention replaces attention %r with sdpa for non-fused calls", current)
        current = "sdpa"
    _hf.register_attention_function(FUSED, _fused_attention)
    for cfg in _hf.all_configs(model):
        setattr(cfg, _BASE_ATTR, current)
    _hf.set_attention_implementation(model, FUSED)
    return model


def disable_fused_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fused_attention` (back to the implementation the model had)."""
    if _hf.attention_implementation(model) == FUSED:
        _hf.set_attention_implementation(model, getattr(model.config, _BASE_ATTR, "sdpa"))
    return model
