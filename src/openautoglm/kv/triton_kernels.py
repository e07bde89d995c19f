"""Triton kernels of the quantized KV cache (CUDA; testable on CPU with ``TRITON_INTERPRET=1``).

* ``decode_kernel``: one decode step of attention (one query token per sequence) read straight from the
  quantized store, flash-decoding style. Program ``(sequence x KV head, split)``: splits ``0..S-1`` each
  take a run of quantized blocks of ``G`` tokens, the last program takes the full-precision window
  (a ring of ``W`` slots, or an exact-size tail). Codes are unpacked and dequantized in registers
  (per-channel key scales of the block folded into the query, per-token value groups), scores and the value sum go through
  ``tl.dot`` with the GQA group's query heads as the rows (padded to 16), and each program writes its
  normalised partial output and log-sum-exp. ``reduce_kernel`` combines the ``S + 1`` partials.
  Token validity: ``lo <= pos < L`` (``lo = L - window`` for sliding-window layers) and, optionally, a
  boolean key mask (padding) indexed by absolute position.
* ``append_kernel``: writes one new token per sequence into the window ring and, when the window is
  full (``(L - R) % G == 0``), quantizes its oldest block into the store - the whole decode-time update
  of the static store in one launch, with the length read on the device (no host sync, CUDA-graph safe).

Layouts: see :mod:`openautoglm.kv.packing` (codes packed along channels, byte ``j`` holding channels
``j * per .. j * per + per - 1``); the store buffers are contiguous in their last two dimensions.
"""

from __future__ import annotations

import triton
import triton.language as tl

SCALE_FLOOR = tl.constexpr(6.103515625e-05)  # smallest normal float16: a constant group keeps a non-zero scale


@triton.jit
def _unpack(p, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(N, D * BITS // 8) uint8 -> (N, D) float32 codes (channel j * per + i at bits BITS * i of byte j)."""
    if BITS == 8:
        return p.to(tl.float32)
    elif BITS == 4:
        lo = (p & 15).to(tl.float32)
        hi = (p >> 4).to(tl.float32)
        return tl.reshape(tl.join(lo, hi), (N, D))
    else:
        c0 = (p & 3).to(tl.float32)
        c1 = ((p >> 2) & 3).to(tl.float32)
        c2 = ((p >> 4) & 3).to(tl.float32)
        c3 = (p >> 6).to(tl.float32)
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (N, D))


@triton.jit
def _attend_tile(q, k, bias, v, valid, m_i, l_i, acc):
    """Online-softmax update with one tile: q (H, D), k/v (N, D) in q's dtype, bias (H,), valid (N,)."""
    s = tl.dot(q, tl.trans(k)) + bias[:, None]  # (H, N) fp32, q already carries the softmax scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def decode_kernel(q_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, rk_ptr, rv_ptr, len_ptr, mask_ptr,
                  o_ptr, lse_ptr, sm_scale, blocks_per_split, ring_size, n_block_slots, blk_base,
                  sq_b, sq_h, skq_b, skq_h, sks_b, sks_h, svq_b, svq_h, svs_b, svs_h, sr_b, sr_h, smask_b,
                  mask_len, so_b, so_h, sl_b, sl_h, n_split,
                  HKV: tl.constexpr, GRP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                  BITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, GV: tl.constexpr, R: tl.constexpr,
                  WINDOW: tl.constexpr, RING_FROM_NQ: tl.constexpr, HAS_MASK: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    DP: tl.constexpr = D * BITS // 8
    NVG: tl.constexpr = D // GV
    L = tl.load(len_ptr).to(tl.int32)
    nq = (tl.maximum(L - R, 0) // G) * G
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(L - WINDOW, 0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, DP)
    hmask = offs_h < GRP
    q = tl.load(q_ptr + b * sq_b + (hk * GRP + offs_h)[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None],
                other=0.0)
    dt = q.dtype
    qf = q.to(tl.float32) * sm_scale
    q = qf.to(dt)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D), tl.float32)
    if split < n_split:  # a run of quantized blocks
        start = lo // G + split * blocks_per_split
        stop = tl.minimum(start + blocks_per_split, nq // G)
        kqb = kq_ptr + b * skq_b + hk * skq_h
        vqb = vq_ptr + b * svq_b + hk * svq_h
        vsb = vs_ptr + b * svs_b + hk * svs_h
        vmb = vm_ptr + b * svs_b + hk * svs_h
        for blk in range(start, stop):
            slot = (blk - blk_base) % n_block_slots
            ks = tl.load(ks_ptr + b * sks_b + hk * sks_h + slot * D + offs_d).to(tl.float32)
            km = tl.load(km_ptr + b * sks_b + hk * sks_h + slot * D + offs_d).to(tl.float32)
            # per-channel key scales folded into the query: q.(c*s + m) = (q*s).c + q.m
            qs = (qf * ks[None, :]).to(dt)
            bias = tl.sum(qf * km[None, :], 1)
            for t in tl.static_range(G // BLOCK_N):
                offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
                pos = blk * G + offs_n
                row = slot * G + offs_n
                valid = pos >= lo
                if HAS_MASK:
                    mv = tl.load(mask_ptr + b * smask_b + pos, mask=pos < mask_len, other=0)
                    valid = valid & (mv != 0)
                k = _unpack(tl.load(kqb + row[:, None] * DP + offs_p[None, :]), BLOCK_N, D, BITS).to(dt)
                vc = _unpack(tl.load(vqb + row[:, None] * DP + offs_p[None, :]), BLOCK_N, D, BITS)
                gidx = row[:, None] * NVG + (offs_d // GV)[None, :]
                v = (vc * tl.load(vsb + gidx).to(tl.float32) + tl.load(vmb + gidx).to(tl.float32)).to(dt)
                m_i, l_i, acc = _attend_tile(qs, k, bias, v, valid, m_i, l_i, acc)
    else:  # the full-precision window: positions max(nq, lo) .. L - 1
        r_lo = tl.maximum(nq, lo)
        rkb = rk_ptr + b * sr_b + hk * sr_h
        rvb = rv_ptr + b * sr_b + hk * sr_h
        for p0 in range(r_lo, L, BLOCK_N):
            pos = p0 + tl.arange(0, BLOCK_N)
            valid = pos < L
            if HAS_MASK:
                mv = tl.load(mask_ptr + b * smask_b + pos, mask=valid & (pos < mask_len), other=0)
                valid = valid & (mv != 0)
            if RING_FROM_NQ:
                slot = pos - nq
            else:
                slot = pos % ring_size
            ptr = slot[:, None] * D + offs_d[None, :]
            k = tl.load(rkb + ptr, mask=(pos < L)[:, None], other=0.0).to(dt)
            v = tl.load(rvb + ptr, mask=(pos < L)[:, None], other=0.0).to(dt)
            m_i, l_i, acc = _attend_tile(q, k, tl.zeros((BLOCK_H,), tl.float32), v, valid, m_i, l_i, acc)
    ok = l_i > 0
    out = acc / tl.where(ok, l_i, 1.0)[:, None]
    lse = tl.where(ok, m_i + tl.log(tl.where(ok, l_i, 1.0)), float("-inf"))
    heads = hk * GRP + offs_h
    tl.store(o_ptr + b * so_b + heads[:, None] * so_h + split * D + offs_d[None, :], out, mask=hmask[:, None])
    tl.store(lse_ptr + b * sl_b + heads * sl_h + split, lse, mask=hmask)


@triton.jit
def reduce_kernel(o_ptr, lse_ptr, out_ptr, so_b, so_h, sl_b, sl_h, sout_b, sout_h, n_heads, n_part,
                  D: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_heads
    h = pid % n_heads
    offs_s = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D)
    smask = offs_s < n_part
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + offs_s, mask=smask, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.exp(lse - mx)
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_s[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * sout_b + h * sout_h + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _pack(codes, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(N, D) int32 codes -> (N, D * BITS // 8) uint8 (inverse of ``_unpack``)."""
    if BITS == 8:
        return codes.to(tl.uint8)
    else:
        PER: tl.constexpr = 8 // BITS
        c3 = tl.reshape(codes, (N, D // PER, PER))
        shifts = tl.arange(0, PER) * BITS
        return tl.sum(c3 << shifts[None, None, :], 2).to(tl.uint8)


@triton.jit
def _codes(x, mn, mx, LEVELS: tl.constexpr):
    """Float16-rounded scale and minimum, then codes floor((x - min) / scale + 0.5) clamped to the levels."""
    scale = ((mx - mn) / LEVELS).to(tl.float16).to(tl.float32)
    scale = tl.maximum(scale, SCALE_FLOOR)
    mn16 = mn.to(tl.float16).to(tl.float32)
    return scale, mn16


@triton.jit
def append_kernel(k_ptr, v_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, rk_ptr, rv_ptr, len_ptr,
                  sk_b, sk_h, sv_b, sv_h, skq_b, skq_h, sks_b, sks_h, svq_b, svq_h, svs_b, svs_h, sr_b, sr_h,
                  ring_size, n_block_slots,
                  HKV: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, GV: tl.constexpr,
                  R: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    hk = pid % HKV
    DP: tl.constexpr = D * BITS // 8
    NVG: tl.constexpr = D // GV
    LEVELS: tl.constexpr = (1 << BITS) - 1
    offs_d = tl.arange(0, D)
    L0 = tl.load(len_ptr).to(tl.int32)
    rkb = rk_ptr + b * sr_b + hk * sr_h
    rvb = rv_ptr + b * sr_b + hk * sr_h
    slot = L0 % ring_size
    tl.store(rkb + slot * D + offs_d, tl.load(k_ptr + b * sk_b + hk * sk_h + offs_d))
    tl.store(rvb + slot * D + offs_d, tl.load(v_ptr + b * sv_b + hk * sv_h + offs_d))
    L = L0 + 1
    if (L >= R + G) & ((L - R) % G == 0):  # the window holds R + G tokens: quantize its oldest block
        tl.debug_barrier()
        blk = (L - R - G) // G
        offs_g = tl.arange(0, G)
        rows = (blk * G + offs_g) % ring_size
        bslot = blk % n_block_slots
        qrows = bslot * G + offs_g
        offs_p = tl.arange(0, DP)
        # keys: per channel over the block's G tokens
        x = tl.load(rkb + rows[:, None] * D + offs_d[None, :]).to(tl.float32)
        scale, mn = _codes(x, tl.min(x, 0), tl.max(x, 0), LEVELS)
        c = tl.floor((x - mn[None, :]) / scale[None, :] + 0.5)
        c = tl.minimum(tl.maximum(c, 0.0), LEVELS).to(tl.int32)
        tl.store(kq_ptr + b * skq_b + hk * skq_h + qrows[:, None] * DP + offs_p[None, :], _pack(c, G, D, BITS))
        tl.store(ks_ptr + b * sks_b + hk * sks_h + bslot * D + offs_d, scale.to(tl.float16))
        tl.store(km_ptr + b * sks_b + hk * sks_h + bslot * D + offs_d, mn.to(tl.float16))
        # values: per token, groups of GV channels
        x = tl.reshape(tl.load(rvb + rows[:, None] * D + offs_d[None, :]).to(tl.float32), (G, NVG, GV))
        scale, mn = _codes(x, tl.min(x, 2), tl.max(x, 2), LEVELS)
        c = tl.floor((x - mn[:, :, None]) / scale[:, :, None] + 0.5)
        c = tl.reshape(tl.minimum(tl.maximum(c, 0.0), LEVELS).to(tl.int32), (G, D))
        tl.store(vq_ptr + b * svq_b + hk * svq_h + qrows[:, None] * DP + offs_p[None, :], _pack(c, G, D, BITS))
        offs_v = qrows[:, None] * NVG + tl.arange(0, NVG)[None, :]
        tl.store(vs_ptr + b * svs_b + hk * svs_h + offs_v, scale.to(tl.float16))
        tl.store(vm_ptr + b * svs_b + hk * svs_h + offs_v, mn.to(tl.float16))
