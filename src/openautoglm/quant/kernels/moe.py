"""Dispatch of the quantized experts (:class:`~openautoglm.quant.experts.QuantExperts`): routed experts only.

``experts_forward(mod, hidden_states (T, h), top_k_index (T, k), top_k_weights (T, k)) -> (T, h)``:

* **decode** (CUDA, ``T <= DECODE_MAX_M``): two launches of the grouped decode GEMV (:func:`.ops_moe.moe_gemv`)
  over the ``T k`` (token, expert) pairs -- gate_up reads only the routed experts' codes, the family's gated
  activation in between, then down -- and the weighted sum over each token's ``k`` experts. No host sync, no
  data-dependent shapes: ``torch.compile(fullgraph=True)`` and CUDA graphs capture it.
* **prefill** (CUDA, more tokens): the pairs sorted by expert, counted per expert (cumulative offsets), and a grouped
  GEMM per projection (:func:`.ops_moe.moe_grouped_mm`: the stack dequantized in one Triton pass, then
  ``torch._grouped_mm`` on sm_90+ or one GEMM per expert). The activations are not quantized at decode or prefill
  (w8a8 experts compute as weight-only int8 / e4m3 there, as the Linears do at decode).
* **reference** (CPU, or formats the kernels do not read: int4 in the old two-codes-a-byte order, ``kernel="torch"``):
  transformers' eager loop over the experts some token was routed to, each expert a quantized Linear of
  :mod:`..linear` (views of the stacks: w8a8 quantizes its activations per token, as its Linears do on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import DECODE_MAX_M, TRITON_OK, ops_moe
from .ops_prefill import FMT_E4M3, FMT_INT4_K32, FMT_INT8

FAST_FMTS = (FMT_INT4_K32, FMT_INT8, FMT_E4M3)


def operands(stack) -> tuple | None:
    """``(codes, scales, zeros, fmt, group, groups_major)`` of a stack for the expert kernels, or None."""
    ops_ = stack.decode_operands()
    return ops_ if ops_ is not None and ops_[3] in FAST_FMTS else None


def fast_ok(mod, x: torch.Tensor) -> bool:
    """The Triton paths apply: CUDA, 16-bit activations, both stacks in a format the expert kernels read."""
    return (x.is_cuda and TRITON_OK and x.dtype in (torch.bfloat16, torch.float16)
            and operands(mod.gate_up) is not None and operands(mod.down) is not None)


def experts_forward(mod, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    if fast_ok(mod, x):
        if top_k_index.shape[0] <= DECODE_MAX_M:
            return decode(mod, x, top_k_index, top_k_weights)
        return prefill(mod, x, top_k_index, top_k_weights)
    return reference(mod, x, top_k_index, top_k_weights)


def _bias(stack, n: int, ids: torch.Tensor) -> torch.Tensor | None:
    return None if stack.bias is None else stack.bias.view(-1, n)[ids]


def decode(mod, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Grouped decode GEMVs over the (token, expert) pairs (see the module docstring)."""
    T, k = top_k_index.shape
    E = mod.num_experts
    ids = top_k_index.reshape(-1)
    w, s, z, fmt, group, gm = operands(mod.gate_up)
    h = ops_moe.moe_gemv(x, w, s, z, ids, k, fmt, group, gm, E)           # (T k, up_rows)
    b = _bias(mod.gate_up, mod.up_rows, ids)
    h = mod.apply_gate(h if b is None else h + b)
    w, s, z, fmt, group, gm = operands(mod.down)
    y = ops_moe.moe_gemv(h, w, s, z, ids, 1, fmt, group, gm, E)           # (T k, hidden)
    b = _bias(mod.down, mod.hidden_dim, ids)
    y = y if b is None else y + b
    return (y.view(T, k, -1) * top_k_weights.unsqueeze(-1)).sum(1).to(x.dtype)


def prefill(mod, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Pairs sorted by expert and one grouped GEMM per projection (see the module docstring)."""
    T, k = top_k_index.shape
    E = mod.num_experts
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, ids.to(torch.int64), torch.ones_like(ids, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[perm // k]
    w, s, z, fmt, group, gm = operands(mod.gate_up)
    h = ops_moe.moe_grouped_mm(xs, w, s, z, offs, fmt, group, gm, E)
    b = _bias(mod.gate_up, mod.up_rows, sorted_ids)
    h = mod.apply_gate(h if b is None else h + b)
    w, s, z, fmt, group, gm = operands(mod.down)
    y = ops_moe.moe_grouped_mm(h, w, s, z, offs, fmt, group, gm, E)
    b = _bias(mod.down, mod.hidden_dim, sorted_ids)
    y = y if b is None else y + b
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    out = torch.empty_like(y).index_copy_(0, perm, y)                     # back to (token, slot) order
    return out.view(T, k, -1).sum(1).to(x.dtype)


def reference(mod, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop with each routed expert's quantized Linears (data-dependent: eager only)."""
    out = torch.zeros_like(x)
    n = mod.num_experts
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)  # (experts + 1, k, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in hit:
        if e >= n:  # expert-parallel sentinel: not this rank's
            continue
        pos, tok = torch.where(mask[e])
        h = mod.apply_gate(mod.expert("up", e)(x[tok]))
        h = mod.expert("down", e)(h) * top_k_weights[tok, pos, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out
