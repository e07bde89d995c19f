"""Decode-exact emulation of a KIVI cache in one teacher-forced forward pass.

Fed one token at a time, a :class:`~.stores.QuantStore` shows the query at position ``t`` the keys and values of
positions ``s < n_q(t) = max(0, (t + 1 - r) // g) * g`` dequantized from their blocks (keys per channel over blocks of
``g`` tokens, values per token in groups of ``min(g, head_dim)`` channels, both blocks aligned from position 0) and
every later position exactly (the full-precision tail of ``r`` to ``r + g - 1`` tokens, the token itself included:
a decode token is stored first, and a window that reaches ``r + g`` flushes its oldest block before attention).
:func:`kivi_emulation` computes that attention for all positions at once: both score matrices (exact and
dequantized keys) are formed and mixed by ``s < n_q(t)``, and the probabilities weight the exact or dequantized
values the same way. The result equals a token-by-token decode through the real cache (tested), at the cost of
one forward instead of ``seq_len`` -- what sensitivity measurement needs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import _hf
from ..evaluate import perplexity
from . import packing
from .layout import resolve_residual


def dequantized(key: torch.Tensor, value: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """key/value (batch, heads, seq, d) with their whole blocks of ``group`` tokens quantized and dequantized."""
    n = key.shape[2] // group * group
    kq, vq = key.clone(), value.clone()
    if n:
        kq[:, :, :n] = packing.dequantize_keys(*packing.quantize_keys(key[:, :, :n], bits, group), bits, key.dtype)
        vg = min(group, value.shape[-1])
        vq[:, :, :n] = packing.dequantize_values(*packing.quantize_values(value[:, :, :n], bits, vg), bits, value.dtype)
    return kq, vq


def _attention(bits: int, group: int, residual: int):
    def fn(module, query, key, value, attention_mask, scaling=None, **kwargs):
        b, hq, T, d = query.shape
        S = key.shape[2]
        if S != T:
            raise ValueError("the KIVI emulation runs on a full teacher-forced pass (no cache)")
        kq, vq = dequantized(key, value, bits, group)
        idx = torch.tensor(_hf.attention_layout(module), device=key.device)
        key, kq, value, vq = (x.index_select(1, idx) for x in (key, kq, value, vq))
        scaling = scaling if scaling is not None else d ** -0.5
        pos = torch.arange(T, device=query.device)
        n_q = ((pos + 1 - residual).clamp_min(0) // group) * group
        out = torch.empty_like(query)
        step = max(1, (1 << 24) // max(1, b * hq * S))  # query rows per block: about 16M scores at a time
        for q0 in range(0, T, step):
            qs = query[:, :, q0:q0 + step]
            t = pos[q0:q0 + step, None]
            use_q = pos[None, :] < n_q[q0:q0 + step, None]                     # (m, S): read dequantized
            scores = torch.where(use_q, qs @ kq.transpose(-1, -2), qs @ key.transpose(-1, -2)) * scaling
            scores = scores.float().masked_fill(pos[None, :] > t, float("-inf"))
            p = torch.softmax(scores, dim=-1).to(query.dtype)
            out[:, :, q0:q0 + step] = (p * use_q) @ vq + (p * ~use_q) @ value
        return out.transpose(1, 2).contiguous(), None

    return fn


@contextlib.contextmanager
def kivi_emulation(model: nn.Module, layer_bits: dict[int, int], group_size: int = 64,
                   residual_length: int | str = 128, context: int | None = None):
    """Inside the block, layers ``{layer: bits}`` attend as if reading a KIVI cache token by token (see module
    docstring); other layers are untouched. Use it for teacher-forced forwards without a cache.
    ``residual_length="auto"`` is sized per layer to ``context`` as the real cache does (``resolve_residual``)."""
    attns = dict(_hf.attention_modules(model))
    with contextlib.ExitStack() as stack:
        for layer, bits in layer_bits.items():
            if bits is not None:
                packing._check_bits(bits)
                r = resolve_residual(residual_length, group_size, context, bits)
                stack.enter_context(_hf.override_attention(attns[layer], _attention(bits, group_size, r)))
        yield model


def layer_bits_of(kv, n_layers: int) -> dict[int, int]:
    """``{layer: bits}`` of the quantized layers of a :class:`~.config.KVCacheConfig` (or None: none)."""
    if kv is None or kv.bits is None:
        return {}
    if kv.share or kv.share_layers:  # a silent emulation without the sharing would report the wrong perplexity
        raise ValueError("the KIVI emulation does not model cross-layer sharing; use kv.metrics.cached_perplexity")
    bits = kv.bits if isinstance(kv.bits, tuple) else (kv.bits,) * n_layers
    return {i: b for i, b in enumerate(bits) if b is not None}


def decode_perplexity(model: nn.Module, kv=None, *, token_ids: torch.Tensor, seq_len: int, batch_size: int = 4,
                      progress: bool = False):
    """Perplexity of non-overlapping ``seq_len`` windows of ``token_ids`` as a token-by-token decode through the
    cache ``kv`` reads them (:func:`kivi_emulation`; equal to ``cached_perplexity(..., chunk=1)``)."""
    g, r = (kv.group_size, kv.residual_length) if kv is not None else (64, 128)
    with kivi_emulation(model, layer_bits_of(kv, len(_hf.decoder_layers(model))), g, r, context=seq_len):
        return perplexity(model, token_ids=token_ids, seq_len=seq_len, batch_size=batch_size, progress=progress)
