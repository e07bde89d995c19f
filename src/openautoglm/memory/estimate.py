"""Analytic memory figures.

Each term is one formula:

* weights: the bytes of every parameter and persistent buffer as stored (quantized tensors included);
* KV cache: ``2 (K and V) x layers x kv_heads x head_dim x tokens x batch x bytes per element``
  (the layout of transformers' DynamicCache/StaticCache for Llama-family attention).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _hf


def dtype_bytes(dtype: torch.dtype | str) -> float:
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8,
                 "fp8": torch.float8_e4m3fn}.get(dtype) or getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and persistent buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        key = t.untyped_storage().data_ptr() if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def kv_cache_bytes(config, tokens: int, batch: int = 1, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes of a full-precision KV cache holding ``tokens`` positions for ``batch`` sequences."""
    if tokens < 0 or batch < 1:
        raise ValueError(f"tokens={tokens} must be >= 0 and batch={batch} >= 1")
    per_token = 2 * _hf.num_layers(config) * _hf.num_kv_heads(config) * _hf.head_dim(config) * dtype_bytes(dtype)
    return int(per_token * tokens * batch)
