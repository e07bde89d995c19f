"""Kernel path for 2:4 sparsity: store 2:4-sparse Linear weights compressed for the GPU's sparse tensor cores.

``torch.sparse.to_sparse_semi_structured`` keeps half the values plus 2-bit position metadata and runs
``F.linear`` through CUTLASS or cuSPARSELt. It needs a CUDA GPU with sparse tensor cores (sm80+) and fp16 or
bf16 weights. This is a runtime conversion: convert after loading (the saved checkpoint stays dense).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .sparsity import DEFAULT_TARGETS, check_nm, target_linears

log = logging.getLogger(__name__)


def semi_structured_bytes(t: torch.Tensor) -> int:
    """Bytes held by a (possibly semi-structured) tensor: all its packed / metadata components."""
    parts = [getattr(t, n, None) for n in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")]
    parts = [p for p in parts if isinstance(p, torch.Tensor)]
    if not parts:
        return t.numel() * t.element_size()
    return sum(p.numel() * p.element_size() for p in parts)


def to_semi_structured(model: nn.Module, targets: list[str] | None = None, *, backend: str | None = None) -> dict:
    """Replace the weights of 2:4-sparse target Linears by semi-structured sparse tensors, in place.

    ``backend``: ``"cutlass"``, ``"cusparselt"`` or None (torch's default). Returns
    ``{"converted": [...], "skipped": {name: reason}, "dense_bytes": n, "sparse_bytes": n}``.
    """
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend not in (None, "cutlass", "cusparselt"):
        raise ValueError(f"unknown backend {backend!r}; accepted: cutlass, cusparselt, None")
    if backend is not None:
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    out = {"converted": [], "skipped": {}, "dense_bytes": 0, "sparse_bytes": 0}
    for name, mod in target_linears(model, list(targets or DEFAULT_TARGETS)).items():
        w = mod.weight
        if not w.is_cuda or w.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: semi-structured sparsity needs fp16/bf16 weights on a CUDA GPU, "
                             f"got {w.dtype} on {w.device}")
        if not check_nm(w.detach(), 2, 4):
            out["skipped"][name] = "weight is not 2:4 sparse"
            continue
        sparse = to_sparse_semi_structured(w.detach())
        out["dense_bytes"] += w.numel() * w.element_size()
        out["sparse_bytes"] += semi_structured_bytes(sparse)
        mod.weight = nn.Parameter(sparse, requires_grad=False)
        out["converted"].append(name)
    for name, why in out["skipped"].items():
        log.info("left %s dense: %s", name, why)
    return out
