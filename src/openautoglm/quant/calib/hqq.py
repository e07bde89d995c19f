"""HQQ: calibration-free optimization of the zero points by half-quadratic splitting with an lp (p < 1) prior.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (Mobius Labs, 2023); the solver is
``optimize_weights_proximal_legacy`` of the ``hqq`` package (``hqq/core/optimize.py``, 0.2.8): with the inverse scale
``a = (2^b - 1) / (max - min)`` and the float zero ``c`` (codes ``round(w * a + c)``), iterate

    W_q = clamp(round(W a + c));  W_r = (W_q - c) / a
    W_e = shrink_lp(W - W_r, beta)                      # sign(x) relu(|x| - |x|^(p-1) / beta)
    c   = mean_group(W_q - (W - W_e) a);  beta *= kappa

with p = 0.7, beta = 10, kappa = 1.01 and at most 20 iterations, stopping when the mean absolute weight error stops
decreasing. Only the zero moves; the scale stays min-max (the package's default; its experimental scale search is
not used). Two deliberate differences from the package: we return the best zero seen (the package returns the one
computed after the first non-improving step), and a ragged last group is edge-padded (:mod:`.rtn`). The result is
mapped to our float-offset convention ``w ~ q * s + z`` with ``s = 1 / a``, ``z = -c / a``; ``zero_point="int"``
rounds ``c`` (a code) after optimizing.
"""

from __future__ import annotations

import torch

from .rtn import GroupQuant, check_args, group_view, quantize_groups


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft threshold of the lp prior: ``sign(x) * relu(|x| - |x|^(p - 1) / beta)``."""
    a = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(a - 1.0 / beta)
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-30).pow(p - 1) / beta)


@torch.no_grad()
def hqq_quantize(weight: torch.Tensor, bits: int = 4, group_size: int | None = 64, *, zero_point: str = "float",
                 lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
                 round_zero_init: bool | None = None) -> GroupQuant:
    """HQQ codes of ``weight: (out, in)`` (asymmetric; see the module docstring).

    ``round_zero_init``: start from a rounded zero (the package does for 4 bits, ``round_zero=True``); default
    follows the package (True for 4 bits).
    """
    check_args(bits, group_size, zero_point)
    if not 0 < lp_norm <= 1:
        raise ValueError(f"lp_norm={lp_norm!r} must be in (0, 1]")
    wg = group_view(weight.float(), group_size)           # (out, G, g)
    levels = 2**bits - 1
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    denom = hi - lo
    a = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), levels / denom).clamp(max=2e4)
    c = -lo * a
    if round_zero_init if round_zero_init is not None else bits == 4:
        c = torch.round(c)
    best_err, best_c = float("inf"), c
    for _ in range(iters):
        wq = torch.round(wg * a + c).clamp(0, levels)
        wr = (wq - c) / a
        err = float((wg - wr).abs().mean())
        if err < best_err:
            best_err, best_c = err, c
        else:
            break
        we = shrink_lp(wg - wr, beta, lp_norm)
        c = torch.mean(wq - (wg - we) * a, dim=-1, keepdim=True)
        beta *= kappa
    s = (1.0 / a).squeeze(-1)
    if zero_point == "int":
        return quantize_groups(weight, s, torch.round(best_c.squeeze(-1)).clamp(0, levels), bits, group_size, "int")
    return quantize_groups(weight, s, (-best_c / a).squeeze(-1), bits, group_size, "float")
