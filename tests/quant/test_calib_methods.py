"""RTN/padding, HQQ, AWQ and SmoothQuant of quant/calib against float references (and the hqq package)."""

import pytest
import torch
from torch import nn

from openautoglm.quant.calib import (act_absmax, apply_scales, awq_quantize, awq_search_clip, awq_search_scales,
                                     dividing_group_size, fold_into_norm, hqq_quantize, rtn, smooth_factors,
                                     smooth_search)
from openautoglm.quant.math import dequantize, quantize


def _outlier_x(tokens=1024, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, :4] *= 30  # a few outlier channels, as in real LLM activations
    return x


# ---------------------------------------------------------------- RTN and padding

@pytest.mark.parametrize("symmetric,zp", [(True, "float"), (False, "float"), (False, "int")])
def test_rtn_matches_math_quantize(symmetric, zp):
    w = torch.randn(16, 128)
    ours = rtn(w, 4, 32, symmetric=symmetric, zero_point=zp)
    ref = quantize(w, 4, symmetric=symmetric, granularity="group", group_size=32, zero_point=zp)
    assert torch.equal(ours.padded().q, ref.q)
    assert torch.allclose(ours.dequantize(), dequantize(ref), atol=1e-6)


def test_padding_round_trips():
    w = torch.randn(8, 72)
    gq = rtn(w, 4, 64)  # ragged last group of 8 columns
    pq = gq.padded()
    assert pq.q.shape == (8, 128) and pq.scale.shape == (8, 2)
    full = dequantize(pq)
    assert torch.allclose(full[:, :72], gq.dequantize(), atol=1e-6)
    assert full[:, 72:].abs().max() <= pq.scale[:, 1:].max() / 2 + 1e-6  # padding dequantizes to ~0
    assert (gq.dequantize() - w).abs().max() <= gq.scale.max() / 2 + 1e-6
    x = torch.randn(3, 72)
    xp = torch.cat([x, torch.zeros(3, 56)], 1)
    assert torch.allclose(xp @ full.t(), x @ gq.dequantize().t(), atol=1e-5)
    assert dividing_group_size(576, 128) == 64 and dividing_group_size(1536, 128) == 128
    assert dividing_group_size(100, 128) is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_within_half_step(bits):
    w = torch.randn(8, 96)
    for sym in (True, False):
        gq = rtn(w, bits, 32, symmetric=sym)
        step = gq.scale.repeat_interleave(32, 1)
        assert ((gq.dequantize() - w).abs() <= step / 2 + 1e-6).all()


# ---------------------------------------------------------------- HQQ

@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 64), (2, 32)])
def test_hqq_reduces_weight_error(bits, gs):
    w = torch.randn(64, 256) * 0.02
    w[torch.rand_like(w) < 0.01] *= 8  # heavy tails, where min-max ranges waste levels
    h = hqq_quantize(w, bits, gs).dequantize()
    r = rtn(w, bits, gs).dequantize()
    assert (h - w).abs().mean() < (r - w).abs().mean()


def test_hqq_matches_the_hqq_package():
    pytest.importorskip("hqq", reason="hqq not installed (pip install hqq==0.2.8.post1)")
    from hqq.core.quantize import Quantizer

    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    for bits in (4, 3):
        wq, meta = Quantizer.quantize(w, nbits=bits, group_size=64, optimize=True, round_zero=bits == 4, axis=1,
                                      bitpack=False, device="cpu")
        theirs = ((wq.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)
        gq = hqq_quantize(w, bits, 64)
        ours = gq.dequantize()
        cos = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
        assert cos > 0.999, cos
        # we keep the best zero seen; the package keeps the one after the first non-improving step
        assert (ours - w).abs().mean() <= (theirs - w).abs().mean() * 1.001
        same = (gq.q == wq.float().reshape(w.shape)).float().mean()
        assert same > 0.9, same  # the same codes nearly everywhere


# ---------------------------------------------------------------- AWQ

def test_awq_scales_reduce_output_error_and_fold_exactly():
    x = _outlier_x()
    norm = nn.LayerNorm(128)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    q, v = nn.Linear(128, 64, bias=False), nn.Linear(128, 32, bias=False)
    s, info = awq_search_scales(norm(x), [q.weight, v.weight], 4, 32)
    assert info["error"] < 0.9 * info["error_rtn"] and info["alpha"] > 0
    y = norm(x)
    ref = torch.cat([q(y), v(y)], 1)
    apply_scales(s, [q, v], norm)
    y2 = norm(x)
    assert torch.allclose(torch.cat([q(y2), v(y2)], 1), ref, atol=1e-4, rtol=1e-4)  # exact in float
    # after folding, the quantized layers' output error beats plain rounding of the original weights
    err = lambda fq_q, fq_v, inp: (torch.cat([inp @ fq_q.t(), inp @ fq_v.t()], 1) - ref).pow(2).mean()
    base_q, base_v = nn.Linear(128, 64, bias=False), nn.Linear(128, 32, bias=False)
    with torch.no_grad():
        base_q.weight.copy_(q.weight / s)
        base_v.weight.copy_(v.weight / s)
    e_rtn = err(rtn(base_q.weight, 4, 32).dequantize(), rtn(base_v.weight, 4, 32).dequantize(), y)
    e_awq = err(awq_quantize(q.weight, y2, 4, 32, clip=False).dequantize(),
                awq_quantize(v.weight, y2, 4, 32, clip=False).dequantize(), y2)
    assert e_awq < 0.9 * e_rtn


def test_awq_clip_search_never_hurts_and_folds_into_a_linear():
    x = _outlier_x(k=96)
    w = torch.randn(48, 96) * 0.05
    w[:, 5] *= 10
    ratio = awq_search_clip(x, w, 3, 32)
    assert ratio.shape == (48, 3) and ratio.min() >= 0.5 and ratio.max() <= 1
    out = lambda gq: (x @ gq.dequantize().t() - x @ w.t()).pow(2).mean()
    assert out(awq_quantize(w, x, 3, 32)) <= out(rtn(w, 3, 32)) * 1.0001
    up, down = nn.Linear(64, 96), nn.Linear(96, 16)
    h = torch.randn(10, 64)
    ref = down(up(h))
    apply_scales(torch.rand(96) + 0.5, [down], up)
    assert torch.allclose(down(up(h)), ref, atol=1e-5)


# ---------------------------------------------------------------- SmoothQuant

class _RMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_smoothquant_preserves_the_product_and_flattens_activations():
    x = _outlier_x()
    w1, w2 = torch.randn(64, 128) * 0.05, torch.randn(32, 128) * 0.05
    s = smooth_factors(act_absmax(x), [w1, w2], 0.5)
    for w in (w1, w2):
        assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), atol=1e-4, rtol=1e-4)
    ratio = lambda a: (a.max() / a.median()).item()
    assert ratio(act_absmax(x / s)) < 0.5 * ratio(act_absmax(x))
    s2, info = smooth_search(x, [w1, w2])
    assert info["error"] <= info["errors"][0.0] and info["alpha"] > 0  # smoothing pays on outlier channels
    norm, lin = _RMSNorm(128), nn.Linear(128, 64, bias=False)
    h = torch.randn(5, 128)
    ref = lin(norm(h))
    fold_into_norm(norm, s2)
    with torch.no_grad():
        lin.weight.mul_(s2)
    assert torch.allclose(lin(norm(h)), ref, atol=1e-4, rtol=1e-4)
