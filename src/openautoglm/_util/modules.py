"""Module helpers every capability uses: replace a submodule, find tied Linears, a model's device and bytes.

Each is defined here once; nothing here imports other openautoglm modules.
"""

from __future__ import annotations

import torch
from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model`` (``"model.layers.0.mlp.up_proj"``)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def tied_names(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` modules whose weight IS the input embedding (a tied ``lm_head``)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return set()
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is emb.weight}


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def model_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and persistent buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        total += tensor_bytes(t, seen)
    return total


def tensor_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """Stored bytes of ``t``; wrapper tensor subclasses (e.g. torchao's quantized tensors) are counted
    through their inner tensors (``__tensor_flatten__``), shared storages once (``seen`` holds their keys)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    if t.is_meta:
        key = id(t)
    else:
        try:
            key = t.untyped_storage().data_ptr()
        except RuntimeError:  # a subclass without flatten support: count its logical size
            return t.numel() * t.element_size()
    if key in seen:
        return 0
    seen.add(key)
    return t.numel() * t.element_size()
