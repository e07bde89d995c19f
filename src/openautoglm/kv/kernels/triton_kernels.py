"""Triton kernels of the quantized KV cache (CUDA; testable on CPU with ``TRITON_INTERPRET=1``).

* ``decode_kernel``: one decode step of attention (one query token per sequence) read straight from the
  quantized store, flash-decoding style. Program ``(sequence x KV head, split)``: splits ``0..S-1`` each
  take a run of quantized blocks of ``G`` tokens, the last program takes the full-precision window
  (a ring of ``W`` slots, or an exact-size tail). The head dimension is processed in 1, 2 or 4 *parts* of
  ``CP`` channels, each inside one packing slice (codes = one shift and one mask of contiguous bytes, no
  shuffles) and one value group. Per-channel key scales are folded into the query
  (``q.(c*s + m) = (q*s).c + q.m``), per-token value scales into the probabilities
  (``p @ (c*s + m) = (p*s) @ c + p @ m``), so the codes go to ``tl.dot`` as they are; the rows of the dot are
  the GQA group's query heads (padded to 16). Each program writes its normalised partial output and
  log-sum-exp; ``reduce_kernel`` combines the ``S + 1`` partials (a program per head and channel chunk).
  Token validity: ``lo <= pos < L``
  (``lo = L - window`` for sliding-window layers) and, optionally, a boolean key mask (padding).
* ``append_kernel``: writes one new token per sequence into the window ring and, when the window is
  full (``(L - R) % G == 0``), quantizes its oldest block into the store - the whole decode-time update
  of the static store in one launch, with the length read on the device (no host sync, CUDA-graph safe).

Layouts: see :mod:`openautoglm.kv.packing` (split-order packing: byte ``j`` holds channels
``j + i * D / per``); the store buffers are contiguous in their last two dimensions.
"""

from __future__ import annotations

import triton
import triton.language as tl

SCALE_FLOOR = tl.constexpr(6.103515625e-05)  # smallest normal float16: a constant group keeps a non-zero scale


@triton.jit
def _codes_part(base, row, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                MAGIC: tl.constexpr):
    """Codes of channels ``PART * CP .. + CP`` of tokens ``row`` (N,): (N, CP) integers, from split-packed bytes."""
    DP: tl.constexpr = D * BITS // 8
    C0: tl.constexpr = PART * CP
    b = tl.load(base + row[:, None] * DP + (C0 % DP) + tl.arange(0, CP)[None, :])
    if MAGIC != 0:  # the codes become 16-bit floats by their bits: unpack them in 16 bits
        b = b.to(tl.int16)
    else:
        b = b.to(tl.int32)
    if BITS == 8:
        return b
    else:
        SHIFT: tl.constexpr = (C0 // DP) * BITS
        return (b >> SHIFT) & ((1 << BITS) - 1)


@triton.jit
def _to_dot(c, dt: tl.constexpr, MAGIC: tl.constexpr):
    """Codes as the dot's input type. ``MAGIC`` (bf16 ``0x4300`` = 128.0 for codes under 128, fp16 ``0x6400`` =
    1024.0 for codes under 1024): the code is OR-ed into the mantissa of that float, which reads as
    ``OFF + code`` exactly -- no integer-to-float conversion (a quarter-rate instruction that bounded the kernel);
    the callers take ``OFF`` off through the bias. Without MAGIC (float32), a conversion."""
    if MAGIC != 0:
        return (c | MAGIC).to(dt, bitcast=True)
    else:
        return c.to(dt)


@triton.jit
def _bytes_all(base, row, D: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr):
    """All packed bytes of tokens ``row`` (N,): (N, D * BITS // 8) integers -- loaded once when every channel part
    lives in the same bytes (INT4/INT2 with one part per packing slice)."""
    DP: tl.constexpr = D * BITS // 8
    b = tl.load(base + row[:, None] * DP + tl.arange(0, DP)[None, :])
    if MAGIC != 0:
        return b.to(tl.int16)
    else:
        return b.to(tl.int32)


@triton.jit
def _part_codes(base, row, allb, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                SHARED: tl.constexpr, MAGIC: tl.constexpr):
    if SHARED:  # CP == D * BITS // 8: part PART is slice PART of the same bytes
        return (allb >> (PART * BITS)) & ((1 << BITS) - 1)
    else:
        return _codes_part(base, row, PART, CP, D, BITS, MAGIC)


@triton.jit
def _score_part(q, kqb, ksb, kmb, row, slot, kall, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                BITS: tl.constexpr, dt: tl.constexpr, SHARED: tl.constexpr, MAGIC: tl.constexpr, OFF: tl.constexpr):
    """Scores (H, N) and bias (H,) of one channel part: q.(c*s + m) = (q*s).c + q.m (key scales folded in q).
    With MAGIC the dot reads ``OFF + c``: the bias takes ``OFF * sum(q*s)`` off, summed over the same rounded
    ``q*s`` the dot multiplies (so the large terms cancel up to float32 rounding)."""
    offs = PART * CP + tl.arange(0, CP)
    ks = tl.load(ksb + slot * D + offs).to(tl.float32)
    km = tl.load(kmb + slot * D + offs).to(tl.float32)
    qs = (q * ks[None, :]).to(dt)
    c = _to_dot(_part_codes(kqb, row, kall, PART, CP, D, BITS, SHARED, MAGIC), dt, MAGIC)
    bias = tl.sum(q * km[None, :], 1)
    if MAGIC != 0:
        bias -= OFF * tl.sum(qs.to(tl.float32), 1)
    return tl.dot(qs, tl.trans(c)), bias


@triton.jit
def _value_part(p, acc, vqb, vsb, vmb, row, vall, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                BITS: tl.constexpr, GV: tl.constexpr, dt: tl.constexpr, SHARED: tl.constexpr, MAGIC: tl.constexpr,
                OFF: tl.constexpr):
    """acc (H, CP) += p @ (c * s + m) for one channel part (one value group): (p * s) @ c + (p @ m)
    (with MAGIC, minus ``OFF * sum(p * s)`` per row, over the rounded ``p * s``)."""
    NVG: tl.constexpr = D // GV
    g: tl.constexpr = PART * CP // GV
    vs = tl.load(vsb + row * NVG + g).to(tl.float32)
    vm = tl.load(vmb + row * NVG + g).to(tl.float32)
    ps = (p * vs[None, :]).to(dt)
    c = _to_dot(_part_codes(vqb, row, vall, PART, CP, D, BITS, SHARED, MAGIC), dt, MAGIC)
    corr = tl.sum(p * vm[None, :], 1)
    if MAGIC != 0:
        corr -= OFF * tl.sum(ps.to(tl.float32), 1)
    return acc + tl.dot(ps, c) + corr[:, None]


@triton.jit
def _online(s, valid, m_i, l_i):
    """Softmax bookkeeping of one tile: probabilities (H, N), the rescale of older sums, new max and sum."""
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _store_part(o_ptr, acc, l_i, heads, hmask, split, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                so_b, so_h, b):
    ok = l_i > 0
    out = acc / tl.where(ok, l_i, 1.0)[:, None]
    offs = PART * CP + tl.arange(0, CP)
    tl.store(o_ptr + b * so_b + heads[:, None] * so_h + split * D + offs[None, :], out, mask=hmask[:, None])


@triton.jit
def decode_kernel(q_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, rk_ptr, rv_ptr, len_ptr, mask_ptr,
                  o_ptr, lse_ptr, sm_scale, blocks_per_split, ring_size, n_block_slots, blk_base,
                  sq_b, sq_h, skq_b, skq_h, sks_b, sks_h, svq_b, svq_h, svs_b, svs_h, sr_b, sr_h, smask_b,
                  mask_len, so_b, so_h, sl_b, sl_h, n_split,
                  HKV: tl.constexpr, GRP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                  BITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, GV: tl.constexpr, R: tl.constexpr,
                  WINDOW: tl.constexpr, RING_FROM_NQ: tl.constexpr, HAS_MASK: tl.constexpr, CP: tl.constexpr,
                  SHARE_BYTES: tl.constexpr, MAGIC: tl.constexpr):
    """Channels are processed in NP = D / CP parts (1, 2 or 4) of CP channels, each inside one packing slice
    and one value group, with one accumulator each (acc0..acc3). ``SHARE_BYTES`` (only where
    ``CP == D * BITS // 8``, INT4/INT2): a tile's packed bytes are loaded once and every part takes its bits
    from them, instead of one load per part of the same bytes."""
    NP: tl.constexpr = D // CP
    SHARED: tl.constexpr = SHARE_BYTES and (CP == D * BITS // 8) and BITS < 8
    OFF: tl.constexpr = 128.0 if MAGIC == 0x4300 else 1024.0
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    L = tl.load(len_ptr).to(tl.int32)
    nq = (tl.maximum(L - R, 0) // G) * G
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(L - WINDOW, 0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, CP)
    hmask = offs_h < GRP
    heads = hk * GRP + offs_h
    qb = q_ptr + b * sq_b + heads[:, None] * sq_h + offs_c[None, :]
    q0 = tl.load(qb, mask=hmask[:, None], other=0.0)
    dt = q0.dtype
    q0 = q0.to(tl.float32) * sm_scale
    q1 = q0
    q2 = q0
    q3 = q0
    if NP > 1:
        q1 = tl.load(qb + CP, mask=hmask[:, None], other=0.0).to(tl.float32) * sm_scale
    if NP > 2:
        q2 = tl.load(qb + 2 * CP, mask=hmask[:, None], other=0.0).to(tl.float32) * sm_scale
        q3 = tl.load(qb + 3 * CP, mask=hmask[:, None], other=0.0).to(tl.float32) * sm_scale
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc0 = tl.zeros((BLOCK_H, CP), tl.float32)
    acc1 = tl.zeros((BLOCK_H, CP), tl.float32)
    acc2 = tl.zeros((BLOCK_H, CP), tl.float32)
    acc3 = tl.zeros((BLOCK_H, CP), tl.float32)
    if split < n_split:  # a run of quantized blocks
        start = lo // G + split * blocks_per_split
        stop = tl.minimum(start + blocks_per_split, nq // G)
        kqb = kq_ptr + b * skq_b + hk * skq_h
        ksb = ks_ptr + b * sks_b + hk * sks_h
        kmb = km_ptr + b * sks_b + hk * sks_h
        vqb = vq_ptr + b * svq_b + hk * svq_h
        vsb = vs_ptr + b * svs_b + hk * svs_h
        vmb = vm_ptr + b * svs_b + hk * svs_h
        for blk in range(start, stop):
            slot = (blk - blk_base) % n_block_slots
            for t in tl.static_range(G // BLOCK_N):
                offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
                pos = blk * G + offs_n
                row = slot * G + offs_n
                valid = pos >= lo
                if HAS_MASK:
                    mv = tl.load(mask_ptr + b * smask_b + pos, mask=pos < mask_len, other=0)
                    valid = valid & (mv != 0)
                kall = 0
                vall = 0
                if SHARED:
                    kall = _bytes_all(kqb, row, D, BITS, MAGIC)
                    vall = _bytes_all(vqb, row, D, BITS, MAGIC)
                s, bias = _score_part(q0, kqb, ksb, kmb, row, slot, kall, 0, CP, D, BITS, dt, SHARED, MAGIC, OFF)
                if NP > 1:
                    s1, b1 = _score_part(q1, kqb, ksb, kmb, row, slot, kall, 1, CP, D, BITS, dt, SHARED, MAGIC, OFF)
                    s += s1
                    bias += b1
                if NP > 2:
                    s2, b2 = _score_part(q2, kqb, ksb, kmb, row, slot, kall, 2, CP, D, BITS, dt, SHARED, MAGIC, OFF)
                    s3, b3 = _score_part(q3, kqb, ksb, kmb, row, slot, kall, 3, CP, D, BITS, dt, SHARED, MAGIC, OFF)
                    s += s2 + s3
                    bias += b2 + b3
                p, alpha, m_i, l_i = _online(s + bias[:, None], valid, m_i, l_i)
                acc0 = _value_part(p, acc0 * alpha[:, None], vqb, vsb, vmb, row, vall, 0, CP, D, BITS, GV, dt, SHARED, MAGIC, OFF)
                if NP > 1:
                    acc1 = _value_part(p, acc1 * alpha[:, None], vqb, vsb, vmb, row, vall, 1, CP, D, BITS, GV, dt,
                                       SHARED, MAGIC, OFF)
                if NP > 2:
                    acc2 = _value_part(p, acc2 * alpha[:, None], vqb, vsb, vmb, row, vall, 2, CP, D, BITS, GV, dt,
                                       SHARED, MAGIC, OFF)
                    acc3 = _value_part(p, acc3 * alpha[:, None], vqb, vsb, vmb, row, vall, 3, CP, D, BITS, GV, dt,
                                       SHARED, MAGIC, OFF)
    else:  # the full-precision window: positions max(nq, lo) .. L - 1
        r_lo = tl.maximum(nq, lo)
        rkb = rk_ptr + b * sr_b + hk * sr_h
        rvb = rv_ptr + b * sr_b + hk * sr_h
        for p0 in range(r_lo, L, BLOCK_N):
            pos = p0 + tl.arange(0, BLOCK_N)
            inside = pos < L
            valid = inside
            if HAS_MASK:
                mv = tl.load(mask_ptr + b * smask_b + pos, mask=inside & (pos < mask_len), other=0)
                valid = valid & (mv != 0)
            if RING_FROM_NQ:
                slot = pos - nq
            else:
                slot = pos % ring_size
            kp = rkb + slot[:, None] * D + offs_c[None, :]
            vp = rvb + slot[:, None] * D + offs_c[None, :]
            s = tl.dot(q0.to(dt), tl.trans(tl.load(kp, mask=inside[:, None], other=0.0).to(dt)))
            if NP > 1:
                s += tl.dot(q1.to(dt), tl.trans(tl.load(kp + CP, mask=inside[:, None], other=0.0).to(dt)))
            if NP > 2:
                s += tl.dot(q2.to(dt), tl.trans(tl.load(kp + 2 * CP, mask=inside[:, None], other=0.0).to(dt)))
                s += tl.dot(q3.to(dt), tl.trans(tl.load(kp + 3 * CP, mask=inside[:, None], other=0.0).to(dt)))
            p, alpha, m_i, l_i = _online(s, valid, m_i, l_i)
            pd = p.to(dt)
            acc0 = acc0 * alpha[:, None] + tl.dot(pd, tl.load(vp, mask=inside[:, None], other=0.0).to(dt))
            if NP > 1:
                acc1 = acc1 * alpha[:, None] + tl.dot(pd, tl.load(vp + CP, mask=inside[:, None], other=0.0).to(dt))
            if NP > 2:
                acc2 = acc2 * alpha[:, None] + tl.dot(pd, tl.load(vp + 2 * CP, mask=inside[:, None], other=0.0).to(dt))
                acc3 = acc3 * alpha[:, None] + tl.dot(pd, tl.load(vp + 3 * CP, mask=inside[:, None], other=0.0).to(dt))
    _store_part(o_ptr, acc0, l_i, heads, hmask, split, 0, CP, D, so_b, so_h, b)
    if NP > 1:
        _store_part(o_ptr, acc1, l_i, heads, hmask, split, 1, CP, D, so_b, so_h, b)
    if NP > 2:
        _store_part(o_ptr, acc2, l_i, heads, hmask, split, 2, CP, D, so_b, so_h, b)
        _store_part(o_ptr, acc3, l_i, heads, hmask, split, 3, CP, D, so_b, so_h, b)
    ok = l_i > 0
    lse = tl.where(ok, m_i + tl.log(tl.where(ok, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + b * sl_b + heads * sl_h + split, lse, mask=hmask)


@triton.jit
def reduce_kernel(o_ptr, lse_ptr, out_ptr, so_b, so_h, sl_b, sl_h, sout_b, sout_h, n_heads, n_part,
                  D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (sequence x query head, channel chunk): the ``n_part`` partials of ``BLOCK_D`` channels weighted
    by their log-sum-exp (chunks spread the reduce over more programs: at batch 1 one program per head left
    most multiprocessors idle)."""
    pid = tl.program_id(0)
    b = pid // n_heads
    h = pid % n_heads
    offs_s = tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    smask = offs_s < n_part
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + offs_s, mask=smask, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.exp(lse - mx)
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_s[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * sout_b + h * sout_h + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _pack(codes, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(N, D) int32 codes -> (N, D * BITS // 8) uint8: byte j holds channels j + i * D / per at bits BITS * i."""
    if BITS == 8:
        return codes.to(tl.uint8)
    else:
        PER: tl.constexpr = 8 // BITS
        c3 = tl.reshape(codes, (N, PER, D // PER))  # split order: slice i -> bits BITS * i
        shifts = tl.arange(0, PER) * BITS
        return tl.sum(c3 << shifts[None, :, None], 1).to(tl.uint8)


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
