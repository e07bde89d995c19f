"""GPTQ: quantize a weight column by column, each rounding error spread over the columns not yet quantized.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (ICLR 2023);
the structure follows the reference code (IST-DASLab/gptq ``gptq.py``, ``fasterquant``): Hessian
``H = 2 X^T X / n`` of the layer inputs, dead columns (``H_jj = 0``) zeroed, damping ``damp * mean(diag H)``, the
upper Cholesky factor of ``H^-1``, and lazy batch updates (a block of columns is processed against its own slice of
``H^-1``; the rest of the matrix gets one GEMM per block). Departures, each deliberate:

* group parameters are computed when the algorithm reaches the group, from the *updated* columns of the block
  (the reference reads the un-updated global ``W`` for a group starting inside a block); the block size is rounded
  to a multiple of the group size so that a group never straddles two blocks. The result equals the unblocked
  algorithm (tested).
* act-order uses **static groups** (GPTQModel/AutoGPTQ ``static_groups=True``; llm-compressor
  ``actorder="weight"``): columns are processed by descending ``diag(H)``, but groups stay the runs of
  ``group_size`` consecutive columns of the original order, so ``g_idx`` is trivial and the grouped kernels run
  unchanged. A group's parameters are computed when its first column is reached (``group_params="first"``: from the
  group's columns as updated by then, pending lazy updates included), or all from the original weight before the
  pass (``"upfront"``, what GPTQModel and llm-compressor do).
* symmetric codes are ``-qmax..qmax`` (our convention), not the ``0..2^b - 1`` with a midpoint zero of the reference.

Shapes: ``weight (out, in)``, calibration inputs ``x (..., in)``, ``H (in, in)``.
"""

from __future__ import annotations

import torch

from .rtn import GroupQuant, check_args, dequantize_codes, n_groups, params, quantize_codes

GROUP_PARAMS = ("first", "upfront")


class HessianAccumulator:
    """Streaming ``H = 2 / n * sum_t x_t x_t^T`` over the calibration tokens of one layer's input.

    ``add(x)`` takes ``x: (..., in)`` (any batch/sequence dims); the running sum is kept in ``dtype`` (float64 by
    default, so a long stream of small updates does not lose precision).
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64, device=None) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)  # the products too: float32 ones lose ~1e-7 relative
        if not torch.isfinite(x).all():
            raise ValueError("calibration input holds NaN/Inf values")
        self.sum += x.t() @ x
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration tokens reached this layer")
        return (2.0 / self.n) * self.sum


def _prepare(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero dead columns, damp; returns ``(W, H, dead)`` in float64/float32."""
    h = h.to(torch.float64).clone()
    w = w.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    return w, h, dead


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (float64), retrying with more damping if ``H`` is not positive definite."""
    idx = torch.arange(h.shape[0], device=h.device)
    extra = 0.0
    for _ in range(6):
        try:
            hh = h.clone()
            hh[idx, idx] += extra
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(hh))
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10, 1e-2 * float(torch.mean(torch.diag(h))))
    raise ValueError("the Hessian is not positive definite even after extra damping; give more calibration tokens")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 128, *,
                  symmetric: bool = False, zero_point: str = "float", damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, group_params: str = "first",
                  clip: float | None = None) -> GroupQuant:
    """GPTQ codes of ``weight: (out, in)`` given ``hessian: (in, in)`` (see the module docstring).

    Parameters
    ----------
    bits : 2, 3, 4 or 8. group_size : columns per group (a ragged last group is allowed) or ``None`` (per row).
    symmetric, zero_point : code convention (:mod:`.rtn`). damp : fraction of ``mean(diag H)`` added to the
    diagonal (0.01 as in the paper). block_size : lazy-batch width. act_order : process columns by descending
    ``diag(H)`` with static groups. group_params : ``"first"`` or ``"upfront"`` (act-order only).
    clip : optional range shrink applied to every group's parameters (as :func:`.rtn.params`).

    Returns
    -------
    GroupQuant with codes ``(out, in)`` and parameters ``(out, n_groups)`` on the original column order.
    """
    check_args(bits, group_size, zero_point)
    if group_params not in GROUP_PARAMS:
        raise ValueError(f"group_params={group_params!r}; accepted: {', '.join(GROUP_PARAMS)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features {cols}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp={damp!r} must be in [0, 1)")
    w, h, _ = _prepare(weight, hessian, damp)
    g = group_size or cols
    ng = n_groups(cols, group_size)
    scale = torch.zeros(rows, ng, device=w.device)
    zero = None if symmetric else torch.zeros(rows, ng, device=w.device)
    done = torch.zeros(ng, dtype=torch.bool)

    def set_group(gi: int, cols_w: torch.Tensor) -> None:
        s, z = params(cols_w.unsqueeze(1), bits, symmetric, zero_point, clip)
        scale[:, gi] = s[:, 0]
        if zero is not None:
            zero[:, gi] = z[:, 0]
        done[gi] = True

    if act_order and group_params == "upfront" or act_order and not group_size:
        for gi in range(ng):  # parameters of the original weight, as GPTQModel static_groups / llm-compressor
            set_group(gi, w[:, gi * g:(gi + 1) * g])
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h).to(w.dtype)
    if not act_order and group_size:
        block_size = max(g, block_size // g * g)
    gid = perm // g  # group of each permuted column
    inv = torch.argsort(perm)  # permuted position of each original column
    q_out = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            gi = int(gid[i1 + i])
            if not done[gi]:
                members = inv[gi * g:min((gi + 1) * g, cols)]  # permuted positions of the group's columns
                cur = w[:, members].clone()
                inblock = (members >= i1) & (members < i2)
                cur[:, inblock] = w1[:, members[inblock] - i1]
                later = members >= i2  # pending lazy updates of this block's columns quantized so far
                if later.any() and i:
                    cur[:, later] -= err1[:, :i] @ hinv[i1:i1 + i][:, members[later]]
                set_group(gi, cur)
            col = w1[:, i]
            s = scale[:, gi]
            z = None if zero is None else zero[:, gi]
            q = quantize_codes(col, s, z, bits, zero_point)
            q_out[:, i1 + i] = q
            e = (col - dequantize_codes(q, s, z, zero_point)) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return GroupQuant(q_out[:, inv], scale, zero, bits, group_size, zero_point)


def layer_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Proxy output error ``trace((W - Wq) H (W - Wq)^T) / 2``: the mean squared output error per token, summed
    over outputs, for ``H = 2 X^T X / n``."""
    d = (weight.double() - approx.double())
    return float(torch.einsum("oi,ij,oj->", d, hessian.double(), d) / 2)
