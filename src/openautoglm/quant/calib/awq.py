"""AWQ: activation-aware per-input-channel scales and a clipping search, measured on calibration activations.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" (MLSys 2024); the
search follows mit-han-lab/llm-awq ``awq/quantize/auto_scale.py`` / ``auto_clip.py`` and casper-hansen/AutoAWQ
``awq/quantize/quantizer.py`` (``_search_best_scale``, ``_compute_best_clip``):

* scales ``s = mean|x|^alpha`` (or, ``duo=True``, ``mean|x|^alpha / mean_w^(1 - alpha)`` with ``mean_w`` the mean
  group-normalized ``|w|`` of the column), normalized by ``sqrt(max s * min s)``, for ``alpha`` on a grid of
  ``n_grid`` points in ``[0, 1)``; the chosen ``s`` minimizes the mean squared *output* error of all the Linears that
  read the input (q/k/v, gate/up) with weights ``Q(W diag(s)) diag(s)^-1``. AutoAWQ measures the error after the
  whole attention / MLP block; we measure it on the Linears' outputs (cheaper, no block re-run). ``alpha = 0``
  (``s = 1``) is on the grid, so the chosen scales never do worse than plain rounding on the calibration tokens.
* the scales are applied as ``W diag(s)`` in the Linears and ``diag(s)^-1`` folded into what produced the input
  (a norm's weight, or the rows of the previous Linear: ``v_proj`` for ``o_proj`` when shapes match, ``up_proj``
  for ``down_proj``) -- :func:`apply_scales`, exact in float.
* clipping: per output row and group, the range is shrunk by ``1 - i / n_grid`` (``i < max_shrink * n_grid``),
  the shrink minimizing the group's partial output error ``(x_g w_g^T - x_g Q(w_g)^T)^2`` on sampled tokens.
  AutoAWQ skips q/k (their errors are amplified by the softmax); callers decide.

Shapes: ``x (tokens, in)``, ``weights [(out_i, in)]``, scales ``(in,)``.
"""

from __future__ import annotations

import torch

from .rtn import GroupQuant, check_args, dequantize_codes, group_view, params, quantize_codes, rtn


def _fq(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, zero_point: str,
        clip=None) -> torch.Tensor:
    return rtn(w, bits, group_size, symmetric=symmetric, zero_point=zero_point, clip=clip).dequantize()


@torch.no_grad()
def awq_search_scales(x: torch.Tensor, weights: list[torch.Tensor], bits: int = 4, group_size: int | None = 128, *,
                      symmetric: bool = False, zero_point: str = "float", n_grid: int = 20, duo: bool = False,
                      max_tokens: int = 4096) -> tuple[torch.Tensor, dict]:
    """Per-input-channel scales ``(in,)`` for the Linears ``weights`` that read ``x: (tokens, in)``.

    Returns ``(scales, info)`` with ``info = {"alpha": best alpha, "error": its output MSE, "error_rtn": at s = 1}``.
    """
    check_args(bits, group_size, zero_point)
    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] > max_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
    w = torch.cat([t.float() for t in weights], 0)  # (sum out, in)
    ref = x @ w.t()
    x_mean = x.abs().mean(0)
    w_mean = None
    if duo:
        wg = group_view(w.abs(), group_size)
        w_mean = (wg / wg.amax(-1, keepdim=True).clamp_min(1e-12)).reshape(w.shape[0], -1)[:, : w.shape[1]].mean(0)
    best = (float("inf"), 0.0, torch.ones_like(x_mean))
    err0 = None
    for i in range(n_grid):
        alpha = i / n_grid
        if duo:
            s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp_min(1e-4)).clamp_min(1e-4)
        else:
            s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = _fq(w * s, bits, group_size, symmetric, zero_point) / s
        err = float((x @ wq.t() - ref).pow(2).mean())
        if i == 0:
            err0 = err
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], {"alpha": best[1], "error": best[0], "error_rtn": err0}


@torch.no_grad()
def awq_search_clip(x: torch.Tensor, weight: torch.Tensor, bits: int = 4, group_size: int | None = 128, *,
                    symmetric: bool = False, zero_point: str = "float", n_grid: int = 20, max_shrink: float = 0.5,
                    max_tokens: int = 512, rows_per_batch: int = 64) -> torch.Tensor:
    """Range shrink ``(out, n_groups)`` per row and group minimizing the group's partial output error."""
    check_args(bits, group_size, zero_point)
    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] > max_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
    xg = group_view(x, group_size)                      # (tokens, G, g) -- edge padding of x is harmless:
    wg_all = group_view(weight.float(), group_size)     # padded w columns repeat the last one, so are masked below
    k, g = weight.shape[1], wg_all.shape[-1]
    mask = (torch.arange(wg_all.shape[1] * g) < k).float().view(1, -1, g)
    out = torch.ones(wg_all.shape[:2])
    for r0 in range(0, weight.shape[0], rows_per_batch):
        wg = wg_all[r0:r0 + rows_per_batch] * mask        # (r, G, g)
        ref = torch.einsum("tGg,rGg->trG", xg, wg)
        best_err = torch.full(wg.shape[:2], float("inf"))
        best = torch.ones(wg.shape[:2])
        for i in range(int(max_shrink * n_grid)):
            ratio = 1 - i / n_grid
            s, z = params(wg, bits, symmetric, zero_point, ratio)
            q = _codes_deq(wg, s, z, bits, zero_point) * mask
            err = (torch.einsum("tGg,rGg->trG", xg, q) - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, ratio), best)
        out[r0:r0 + rows_per_batch] = best
    return out


def _codes_deq(wg, s, z, bits, zero_point):
    s = s.unsqueeze(-1)
    z = None if z is None else z.unsqueeze(-1)
    return dequantize_codes(quantize_codes(wg, s, z, bits, zero_point), s, z, zero_point)


def awq_quantize(weight: torch.Tensor, x: torch.Tensor | None = None, bits: int = 4, group_size: int | None = 128, *,
                 symmetric: bool = False, zero_point: str = "float", clip: bool = True, **kw) -> GroupQuant:
    """Codes of an already scaled ``weight`` (``W diag(s)``), with the clipping search on ``x`` (its input, scaled
    by ``1/s``) when ``clip`` and ``x`` is given; plain rounding otherwise."""
    ratio = awq_search_clip(x, weight, bits, group_size, symmetric=symmetric, zero_point=zero_point, **kw) \
        if clip and x is not None else None
    return rtn(weight, bits, group_size, symmetric=symmetric, zero_point=zero_point, clip=ratio)


@torch.no_grad()
def apply_scales(scales: torch.Tensor, consumers: list[torch.nn.Module], producer: torch.nn.Module) -> None:
    """Fold ``diag(s)^-1`` into ``producer`` and ``diag(s)`` into the ``consumers`` (Linears), in place.

    ``producer``: a norm (``weight (in,)``, optional ``bias``) or a Linear whose output rows feed the consumers
    (``weight (in, k)``, optional ``bias (in,)``). The composed function is unchanged in float.
    """
    s = scales.float()
    pw = producer.weight
    if pw.dim() == 1:
        if pw.shape[0] != s.shape[0]:
            raise ValueError(f"norm of {pw.shape[0]} features cannot take {s.shape[0]} scales")
        pw.data = (pw.float() / s).to(pw.dtype)
    else:
        if pw.shape[0] != s.shape[0]:
            raise ValueError(f"producer Linear has {pw.shape[0]} outputs, scales are for {s.shape[0]}")
        pw.data = (pw.float() / s.unsqueeze(1)).to(pw.dtype)
    if getattr(producer, "bias", None) is not None:
        producer.bias.data = (producer.bias.float() / s).to(producer.bias.dtype)
    for m in consumers:
        m.weight.data = (m.weight.float() * s).to(m.weight.dtype)
