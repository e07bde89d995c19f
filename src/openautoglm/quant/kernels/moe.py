"""Dispatch of the quantized experts (:class:`~openautoglm.quant.experts.QuantExperts`): routed experts only.

``experts_forward(mod, hidden_states (T, h), top_k_index (T, k), top_k_weights (T, k)) -> (T, h)``:

* reference (CPU, or where the fast paths do not apply): transformers' eager loop over the experts some token
  was routed to, each expert a quantized Linear of :mod:`..linear` (views of the stacks, its own kernels), the
  routed outputs weighted and summed into the tokens (``index_add_``) as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def experts_forward(mod, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    return reference(mod, x, top_k_index, top_k_weights)


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
