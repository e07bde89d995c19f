"""SmoothQuant: move activation outliers into the weights before W8A8, folded into the preceding norm.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models" (ICML
2023); mit-han-lab/smoothquant ``smoothquant/smooth.py`` (``smooth_ln_fcs``) and llm-compressor's
``SmoothQuantModifier`` (mappings q/k/v <- input norm, gate/up <- post-attention norm, down <- up):

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)        (max over tokens / over every consumer's rows)
    X' = X diag(s)^-1,  W' = W diag(s)                       X' W'^T == X W^T in exact arithmetic

``diag(s)^-1`` goes into the norm's weight (and bias) or the producing Linear's rows
(:func:`openautoglm.quant.calib.awq.apply_scales` does the folding), so inference pays nothing.
:func:`smooth_search` picks ``alpha`` per input on calibration activations by the simulated W8A8 output error
(per-channel int8 weights, per-token int8 activations), ``alpha = 0`` (no smoothing, ``s`` only balancing the
weights' columns) and the paper's 0.5 both on the grid.

Shapes: ``x (tokens, in)``, ``weights [(out_i, in)]``, factors ``(in,)``.
"""

from __future__ import annotations

import torch

_EPS = 1e-5


def act_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``max |x|`` over all tokens of ``x: (..., in)`` -> ``(in,)``."""
    return x.reshape(-1, x.shape[-1]).abs().amax(0).float()


def smooth_factors(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1 - alpha)`` per input channel ``(in,)`` (clamped to >= 1e-5)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1]")
    w_absmax = torch.cat([w.float().abs() for w in weights], 0).amax(0).clamp_min(_EPS)
    s = x_absmax.float().clamp_min(_EPS).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp_min(_EPS)


def fake_w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Simulated W8A8 product ``Qa(x) Qw(w)^T``: symmetric int8, per-token activations, per-channel weights."""
    xs = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    ws = (w.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    xq = torch.clamp(torch.round(x / xs), -127, 127) * xs
    wq = torch.clamp(torch.round(w / ws), -127, 127) * ws
    return xq @ wq.t()


@torch.no_grad()
def smooth_search(x: torch.Tensor, weights: list[torch.Tensor], alphas=(0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                  max_tokens: int = 4096) -> tuple[torch.Tensor, dict]:
    """Smoothing factors ``(in,)`` for the Linears ``weights`` reading ``x: (tokens, in)``, with the ``alpha``
    of ``alphas`` that minimizes the simulated W8A8 output MSE. Returns ``(s, {"alpha", "error", "errors"})``."""
    x = x.reshape(-1, x.shape[-1]).float()
    amax = act_absmax(x)  # from every token, as the paper's calibration
    if x.shape[0] > max_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
    w = torch.cat([t.float() for t in weights], 0)
    ref = x @ w.t()
    errors = {}
    best = (float("inf"), None, None)
    for a in alphas:
        s = smooth_factors(amax, [w], a)
        err = float((fake_w8a8(x / s, w * s) - ref).pow(2).mean())
        errors[a] = err
        if err < best[0]:
            best = (err, a, s)
    return best[2], {"alpha": best[1], "error": best[0], "errors": errors}


@torch.no_grad()
def fold_into_norm(norm: torch.nn.Module, s: torch.Tensor, *, weight_offset: float = 0.0) -> None:
    """Divide a RMSNorm/LayerNorm's output by ``s`` in place: ``weight /= s`` (and ``bias /= s``).

    ``weight_offset``: norms that compute ``x * (offset + weight)`` (Gemma: 1) get
    ``weight = (offset + weight) / s - offset``.
    """
    w = norm.weight
    if w.shape != s.shape:
        raise ValueError(f"norm weight {tuple(w.shape)} does not match {tuple(s.shape)} factors")
    w.data = ((w.float() + weight_offset) / s - weight_offset).to(w.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.float() / s).to(norm.bias.dtype)
