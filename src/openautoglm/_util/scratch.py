"""Per-device scratch buffers shared by the kernels of several capabilities."""

from __future__ import annotations

import torch

_TICKETS: dict[str, torch.Tensor] = {}


def tickets(device: torch.device, n: int = 4096) -> torch.Tensor:
    """Per-device int32 tickets of the split-K reductions (the quantized GEMVs, the dense decode attention);
    every launch leaves them at zero.

    Allocated once, outside any CUDA graph (:class:`~openautoglm.quant.linear.QuantLinear` asks for them when it
    moves to a GPU): a buffer first allocated inside a captured region would belong to that graph's memory pool.
    Launches on one device share them, so these kernels must not run concurrently on two streams of one device.
    """
    key = str(device)
    t = _TICKETS.get(key)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _TICKETS[key] = t
    return t
