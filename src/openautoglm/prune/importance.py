"""Importance scores for pruning: magnitude, activation-aware (Wanda), first-order Taylor and diagonal Fisher.

Three layers, kept apart:

* calibration data -- :func:`calibration_ids` cuts windows from the bundled held-out text or user text;
* statistics from forward/backward passes -- :func:`input_sq_norms` (per input feature, summed over tokens),
  :func:`head_mask_grads` (dL/d mask of each attention head, as Michel et al. 2019) and
  :func:`weight_grads` (dL/dW); each shows a progress bar;
* pure scoring and ranking -- :func:`weight_scores`, :func:`head_scores`, :func:`keep_masks`.

Methods
-------
``magnitude``  |W| (no data).
``wanda``      |W_ij| * ||X_j||_2, X the layer's input over the calibration tokens (Sun et al. 2023).
``taylor``     first-order Taylor: |W * dL/dW| for weights; E_x |dL(x)/d xi_h| for a head mask xi_h.
``fisher``     diagonal Fisher (squared gradient) estimate of the Hessian term: 0.5 * E[g^2] * W^2 for
               weights, E[(dL/d xi_h)^2] for heads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import _hf
from .._util.finite import InputWatch, check_loss
from ..evaluate import heldout_token_ids

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "taylor", "fisher")
SCOPES = ("per_layer", "global")


def check_method(method: str, allowed: Iterable[str] = METHODS) -> str:
    allowed = tuple(allowed)
    if method not in allowed:
        raise ValueError(f"unknown importance method {method!r}; accepted: {', '.join(allowed)}")
    return method


# ----------------------------------------------------------------------------- calibration data

def calibration_ids(
    tokenizer=None,
    text: str | None = None,
    *,
    token_ids: torch.Tensor | None = None,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Calibration windows, shape ``(n_samples, seq_len)``.

    Source: ``token_ids`` if given, else ``text`` tokenized, else the second half of the bundled held-out
    text (the first half is what the benchmarks evaluate perplexity on). Windows start at random offsets.
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"n_samples={n_samples} must be >= 1 and seq_len={seq_len} >= 2")
    if token_ids is None:
        if tokenizer is None:
            raise ValueError("calibration needs a tokenizer (or token_ids)")
        token_ids = heldout_token_ids(tokenizer, text)
        if text is None:
            token_ids = token_ids[token_ids.numel() // 2:]
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if token_ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {token_ids.numel()} tokens; need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])


def _batches(ids: torch.Tensor, batch_size: int, desc: str, progress: bool):
    for i in tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        yield ids[i : i + batch_size]


def _lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------- statistics

@torch.no_grad()
def input_sq_norms(model: nn.Module, modules: dict[str, nn.Linear], ids: torch.Tensor, *,
                   batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """Sum over calibration tokens of each input feature squared, ``name -> (in_features,)`` float32."""
    device = next(model.parameters()).device
    acc = {n: torch.zeros(_hf.in_features(m), dtype=torch.float32, device=device) for n, m in modules.items()}
    watch, batch = InputWatch("calibration (input norms)"), None

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float()
            watch.see(name, x)
            acc[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for x in _batches(ids, batch_size, "calibration", progress):
            batch = x.to(device)
            model(input_ids=batch, use_cache=False)
            if watch.bad:
                break
    finally:
        for h in handles:
            h.remove()
    watch.raise_if_bad(model, batch)
    return acc


def head_mask_grads(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 1,
                    progress: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-batch gradients of the LM loss w.r.t. a multiplicative mask on every query head's output.

    A mask ``xi`` of ones, shape ``(n_heads_l,)``, scales the per-head slices of each ``o_proj`` input.
    Returns ``(mean |g|, mean g^2)`` per layer, each ``(n_heads_l,)``: Michel et al.'s importance and the
    diagonal Fisher of the mask. Parameters get no gradients.
    """
    device = next(model.parameters()).device
    attns = list(_hf.attention_modules(model))
    masks = [torch.ones(len(_hf.attention_layout(a)), device=device, requires_grad=True) for _, a in attns]

    def hook(mask, hd):
        def fn(mod, args):
            x = args[0]
            shape = x.shape
            x = (x.reshape(*shape[:-1], -1, hd) * mask.to(x.dtype)[:, None]).reshape(shape)
            return (x, *args[1:])
        return fn

    outs = [_hf.output_projection(a) for _, a in attns]
    handles = [o.register_forward_pre_hook(hook(m, a.head_dim)) for m, o, (_, a) in zip(masks, outs, attns)]
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    abs_sum = [torch.zeros_like(m) for m in masks]
    sq_sum = [torch.zeros_like(m) for m in masks]
    n, bad, loss = 0, None, None
    try:
        for x in _batches(ids, batch_size, "head gradients", progress):
            loss = _lm_loss(model, x.to(device))
            if not torch.isfinite(loss.detach()):
                bad = x.to(device)
                break
            grads = torch.autograd.grad(loss, masks)
            for a, s, g in zip(abs_sum, sq_sum, grads):
                a += g.abs()
                s += g.pow(2)
            n += 1
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
    if bad is not None:
        check_loss(loss, "head importance (head-mask gradients)", model, bad)
    return [a / n for a in abs_sum], [s / n for s in sq_sum]


def weight_grads(model: nn.Module, modules: dict[str, nn.Linear], ids: torch.Tensor, *, batch_size: int = 1,
                 progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean gradient and mean squared gradient of the LM loss for each module's weight, ``name -> (out, in)``."""
    device = next(model.parameters()).device
    params = {n: m.weight for n, m in modules.items()}
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    g_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    sq_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n_b, bad, loss = 0, None, None
    try:
        for x in _batches(ids, batch_size, "weight gradients", progress):
            loss = _lm_loss(model, x.to(device))
            if not torch.isfinite(loss.detach()):
                bad = x.to(device)
                break
            grads = torch.autograd.grad(loss, list(params.values()))
            for name, g in zip(params, grads):
                g_sum[name] += g.float()
                sq_sum[name] += g.float().pow(2)
            n_b += 1
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
    if bad is not None:
        check_loss(loss, "weight importance (gradients)", model, bad)
    return {k: v / n_b for k, v in g_sum.items()}, {k: v / n_b for k, v in sq_sum.items()}


# ----------------------------------------------------------------------------- pure scoring

def weight_scores(weight: torch.Tensor, method: str, *, in_sq_norm: torch.Tensor | None = None,
                  grad: torch.Tensor | None = None, grad_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every entry of ``weight`` (out, in) -> (out, in) float32; larger = more important.

    ``in_sq_norm`` (in,) for ``wanda``; ``grad`` (out, in) for ``taylor``; ``grad_sq`` (out, in) for ``fisher``.
    """
    check_method(method)
    w = weight.detach().float()
    if method == "magnitude":
        return w.abs()
    if method == "wanda":
        if in_sq_norm is None or in_sq_norm.shape != (w.shape[1],):
            raise ValueError(f"wanda needs input norms of shape ({w.shape[1]},)")
        return w.abs() * in_sq_norm.float().sqrt()[None, :]
    if method == "taylor":
        if grad is None:
            raise ValueError("taylor needs the weight gradient")
        return (w * grad.float()).abs()
    if grad_sq is None:
        raise ValueError("fisher needs the mean squared gradient")
    return 0.5 * grad_sq.float() * w.pow(2)


def head_scores(attn: nn.Module, method: str, *, o_in_sq_norm: torch.Tensor | None = None,
                mask_grad_abs: torch.Tensor | None = None, mask_grad_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each query head of one attention module -> (n_heads,) float32.

    magnitude: sum |W_q[head rows]| + |W_o[:, head cols]|; wanda: sum |W_o[:, head cols]| * ||X_o||;
    taylor / fisher: the head-mask gradient statistics from :func:`head_mask_grads`.
    """
    check_method(method)
    hd = int(attn.head_dim)
    wo = _hf.output_weight(attn).detach().float()
    n = wo.shape[1] // hd
    if method == "magnitude":
        wq = _hf.query_weight(attn).detach().float()
        return wq.abs().reshape(n, hd, -1).sum((1, 2)) + wo.abs().reshape(-1, n, hd).sum((0, 2))
    if method == "wanda":
        if o_in_sq_norm is None:
            raise ValueError("wanda needs the o_proj input norms")
        return weight_scores(wo, "wanda", in_sq_norm=o_in_sq_norm).reshape(-1, n, hd).sum((0, 2))
    stat = mask_grad_abs if method == "taylor" else mask_grad_sq
    if stat is None:
        raise ValueError(f"{method} needs head-mask gradients")
    return stat.detach().float().clone()


def keep_masks(scores: list[torch.Tensor], *, ratio: float | None = None, count: int | None = None,
               threshold: float | None = None, scope: str = "per_layer", min_keep: int = 0) -> list[torch.Tensor]:
    """Boolean keep-masks (same shapes as ``scores``) removing the lowest-scored entries.

    Exactly one of ``ratio`` (fraction removed, in (0, 1)), ``count`` (entries removed) or ``threshold``
    (remove scores below it). ``per_layer`` removes the same fraction from each tensor; ``global`` ranks all
    entries together. ``min_keep`` entries per tensor always survive (global scope).
    """
    if sum(v is not None for v in (ratio, count, threshold)) != 1:
        raise ValueError("give exactly one of ratio, count or threshold")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; accepted: {', '.join(SCOPES)}")
    total = sum(s.numel() for s in scores)
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio={ratio} must be in (0, 1)")
    if count is not None and not 0 < count < total:
        raise ValueError(f"count={count} must be in [1, {total - 1}] ({total} entries exist)")
    if threshold is not None:
        return [s >= threshold for s in scores]
    if scope == "per_layer":
        out = []
        for s in scores:
            k = round(ratio * s.numel()) if ratio is not None else round(count * s.numel() / total)
            out.append(_drop_lowest(s.flatten(), k).view_as(s))
        return out
    k = round(ratio * total) if ratio is not None else count
    flat = torch.cat([s.flatten().float() for s in scores])
    protect = torch.zeros_like(flat, dtype=torch.bool)
    off = 0
    for s in scores:  # the min_keep best entries of each tensor are never removed
        if min_keep:
            top = s.flatten().float().topk(min(min_keep, s.numel())).indices
            protect[off + top] = True
        off += s.numel()
    if k > (~protect).sum():
        raise ValueError(f"cannot remove {k} of {total} entries while keeping {min_keep} per layer")
    flat = flat.masked_fill(protect, float("inf"))
    keep = _drop_lowest(flat, k)
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def _drop_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        keep[flat.float().topk(k, largest=False).indices] = False
    return keep
