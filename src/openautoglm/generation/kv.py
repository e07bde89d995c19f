"""Generation with a compressed KV cache: the fast path chosen for the user.

``generate_with(model, input_ids, kv)`` builds the cache ``kv`` describes, preallocated for exactly the
prompt plus the new tokens when it is a quantized cache (so decode reads it with the fused kernel and no
store ever grows), switches the model to the fused attention function, and calls ``model.generate``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _hf
from ..kv.attention import enable_fused_attention
from ..kv.config import KVCacheConfig


@torch.no_grad()
def generate_with(model: nn.Module, input_ids: torch.Tensor, kv: KVCacheConfig, *, max_new_tokens: int = 64,
                  fused: bool = True, **generate_kwargs):
    """``model.generate`` with the cache ``kv``; returns ``(sequences (batch, prompt + new), cache)``.

    fused : read the quantized cache directly at decode (:func:`enable_fused_attention`, in place); the
        cache is then preallocated for ``prompt + max_new_tokens`` tokens. MiniCache (``kv.share``) caches
        grow with the sequence.
    """
    total = input_ids.shape[1] + max_new_tokens
    static = fused and kv.bits is not None and not kv.share
    cache = kv.build(model.config, max_cache_len=total if static else None, context=total)
    if fused:
        enable_fused_attention(model)
    out = _hf.generate_with_cache(model, input_ids, cache, max_new_tokens=max_new_tokens, **generate_kwargs)
    return out, cache
