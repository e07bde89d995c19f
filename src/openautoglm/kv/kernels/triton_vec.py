"""Decode attention over the quantized KV store for one query head per KV head (GQA group 1), without ``tl.dot``.

The ``tl.dot`` kernel of :mod:`.triton_kernels` pads the group's query rows to 16, so at group 1 it runs
16 rows of MMA, softmax and accumulators for one real row, and moves every tile of codes through shared
memory into the MMA operand layout. Here a tile of ``BLOCK_N`` tokens stays in the registers it was loaded
into, and every product is summed inside the thread:

* codes: read as int32 words (``WORDS`` a thread: 2 by default, so a thread holds 16 channels of a part and
  four rows, fewer per-channel registers than a 16-byte load's 32) or as bytes (``WORDS=0``). ``f = 2^BITS +
  code`` is made by one shift and one ``lop3`` straight from the word (the code is moved under the mantissa
  of the float ``2^BITS`` and OR-ed in; no byte extraction, no integer-to-float conversion).
* scores: ``raw (N, CP) = sum over parts of f * (q * ks)`` from a per-channel constant, then one row sum
  (threads of a row: shuffles, no shared memory); the constant takes ``2^BITS * (q * ks)`` and the key
  minimum ``q * km`` off.
* values: the accumulator keeps the token axis, ``acc (N, CP) += (p * vs) f`` per element, and is summed over
  tokens once, after the loop; the per-token offsets (value minimum, ``2^BITS``) go to a per-token vector the
  same way. So a tile costs one CTA-wide reduction (the running maximum). With ``LAZY`` > 0 the accumulators
  are rescaled only when that maximum grows by more than ``LAZY`` (then ``p <= e^LAZY``), not every tile
  (``LAZY=0``: ``acc * alpha`` every tile, one more multiply per element).
* the full-precision window (last program) is read the same way in float.

Same program grid, arguments and partial-output layout as ``decode_kernel`` (``reduce_kernel`` combines them).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _place(w, AMT: tl.constexpr):
    """``w`` shifted left by ``AMT`` bits (right by ``-AMT`` where negative; the caller masks what it keeps)."""
    if AMT >= 0:
        return w << AMT
    else:
        return w >> (-AMT)


@triton.jit
def _fcodes(b, base, SHIFT: tl.constexpr, BITS: tl.constexpr, WORDS: tl.constexpr = 0):
    """Float32 ``2^BITS + code`` of the ``BITS``-wide field at bit ``SHIFT`` of each byte: the field is shifted
    to mantissa bits ``23 - BITS ..`` and OR-ed into ``2^BITS`` (exact). ``b``: the bytes (N, C) uint8, or
    (``WORDS``) int32 words (N, C / 4) holding them four a word (byte ``j`` of a word is channel ``4 * word +
    j``): one shift and one and-or per code straight from the word, no byte extraction. ``base``: the bits
    of ``2^BITS`` as a runtime int32 (a register, so that mask-and-or is one ``lop3``: a literal there would
    take two, ``lop3`` has one immediate operand)."""
    P: tl.constexpr = 23 - BITS
    BASE: tl.constexpr = (127 + BITS) << 23
    MASK: tl.constexpr = ((1 << BITS) - 1) << P
    if WORDS:
        f0 = (_place(b, P - SHIFT) & MASK) | base
        f1 = (_place(b, P - SHIFT - 8) & MASK) | base
        f2 = (_place(b, P - SHIFT - 16) & MASK) | base
        f3 = (_place(b, P - SHIFT - 24) & MASK) | base
        f = tl.join(tl.join(f0, f2), tl.join(f1, f3))  # [..., y, x] = byte 2y + x
        f = tl.reshape(f, (b.shape[0], 4 * b.shape[1]))
    else:
        f = ((b.to(tl.int32) << (P - SHIFT)) & MASK) | BASE  # the kernel as first tuned: literal
    return f.to(tl.float32, bitcast=True)


@triton.jit
def _bytes(base, row, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
           WORDS: tl.constexpr = 0):
    """A tile's packed codes of one channel part: (N, CP) bytes, or (``WORDS``) (N, CP / 4) int32 words."""
    DP: tl.constexpr = D * BITS // 8
    if WORDS:
        wb = base.to(tl.pointer_type(tl.int32))
        cols = tl.arange(0, CP // 4)
        if WORDS < 4:  # runs of WORDS words: a thread loads WORDS words a row and so holds fewer channels
            cols = (cols // WORDS) * WORDS + cols % WORDS
        return tl.load(wb + row[:, None] * (DP // 4) + ((PART * CP) % DP) // 4 + cols[None, :])
    else:
        return tl.load(base + row[:, None] * DP + (PART * CP) % DP + tl.arange(0, CP)[None, :])


@triton.jit
def _kscale(q, ksb, kmb, slot, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(q * ks, q * (km - 2^BITS ks)) of one channel part: the codes' factor and the per-channel constant."""
    B: tl.constexpr = 1 << BITS
    offs = PART * CP + tl.arange(0, CP)
    ks = tl.load(ksb + slot * D + offs).to(tl.float32)
    km = tl.load(kmb + slot * D + offs).to(tl.float32)
    qs = q * ks
    return qs, q * km - B * qs


@triton.jit
def _kpart(raw, kb, base, qs, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
           WORDS: tl.constexpr):
    """raw + f * (q * ks) for one channel part (one FMA a code)."""
    DP: tl.constexpr = D * BITS // 8
    return raw + _fcodes(kb, base, (PART * CP // DP) * BITS, BITS, WORDS) * qs[None, :]


@triton.jit
def _vpart(acc, cor, vb, base, p, alpha, vsb, vmb, row, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
           BITS: tl.constexpr, GV: tl.constexpr, LAZY: tl.constexpr, WORDS: tl.constexpr):
    """acc (N, CP) = acc * alpha + (p * vs) f; cor (N,) = cor * alpha + p * (vm - 2^BITS vs) (``LAZY``: the
    caller rescales, rarely, so here acc + (p * vs) f: one FMA a code)."""
    DP: tl.constexpr = D * BITS // 8
    NVG: tl.constexpr = D // GV
    B: tl.constexpr = 1 << BITS
    g: tl.constexpr = PART * CP // GV
    vs = tl.load(vsb + row * NVG + g).to(tl.float32)
    vm = tl.load(vmb + row * NVG + g).to(tl.float32)
    ps = p * vs
    f = _fcodes(vb, base, (PART * CP // DP) * BITS, BITS, WORDS)
    if LAZY:
        return acc + ps[:, None] * f, cor + p * (vm - B * vs)
    return acc * alpha + ps[:, None] * f, cor * alpha + p * (vm - B * vs)


@triton.jit
def _online(s, valid, m_i):
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp(s - m_safe), tl.exp(m_i - m_safe), m_new


@triton.jit
def _store(o_ptr, acc, cor, l_i, b, hk, split, PART: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, so_b, so_h):
    out = (tl.sum(acc, 0) + cor) / tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_ptr + b * so_b + hk * so_h + split * D + PART * CP + tl.arange(0, CP), out)


@triton.jit
def decode_vec_kernel(q_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, rk_ptr, rv_ptr, len_ptr, mask_ptr,
                      o_ptr, lse_ptr, sm_scale, blocks_per_split, ring_size, n_block_slots, blk_base,
                      sq_b, sq_h, skq_b, skq_h, sks_b, sks_h, svq_b, svq_h, svs_b, svs_h, sr_b, sr_h, smask_b,
                      mask_len, so_b, so_h, sl_b, sl_h, n_split, magic_base,
                      HKV: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                      BLOCK_N: tl.constexpr, GV: tl.constexpr, R: tl.constexpr, WINDOW: tl.constexpr,
                      RING_FROM_NQ: tl.constexpr, HAS_MASK: tl.constexpr, CP: tl.constexpr,
                      LAZY: tl.constexpr = 0.0, WORDS: tl.constexpr = 0):
    """One query head per KV head (query head ``hk`` of sequence ``b``); channels in NP = D / CP parts
    (1, 2 or 4), each inside one packing slice and one value group; where a part is the whole of a row's bytes
    (INT4/INT2, ``CP == D * BITS // 8``) the bytes are loaded once for every part. ``LAZY`` > 0: the
    accumulators are rescaled only when the running maximum of the scores grows by more than ``LAZY``
    (natural-log units; the probabilities stay <= e^LAZY, exact in float32), not every tile. ``WORDS`` (2, 4):
    the codes are read as int32 words, that many a thread; 0: as bytes. ``magic_base``: the float32 bits of
    ``2^BITS``, ``(127 + BITS) << 23``, passed at run time (see :func:`_fcodes`)."""
    NP: tl.constexpr = D // CP
    DP: tl.constexpr = D * BITS // 8
    SHARED: tl.constexpr = (CP == DP) and BITS < 8
    TPB: tl.constexpr = G // BLOCK_N
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    L = tl.load(len_ptr).to(tl.int32)
    nq = (tl.maximum(L - R, 0) // G) * G
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(L - WINDOW, 0)
    offs_c = tl.arange(0, CP)
    offs_t = tl.arange(0, BLOCK_N)
    qb = q_ptr + b * sq_b + hk * sq_h + offs_c
    q0 = tl.load(qb).to(tl.float32) * sm_scale
    q1 = q0
    q2 = q0
    q3 = q0
    if NP > 1:
        q1 = tl.load(qb + CP).to(tl.float32) * sm_scale
    if NP > 2:
        q2 = tl.load(qb + 2 * CP).to(tl.float32) * sm_scale
        q3 = tl.load(qb + 3 * CP).to(tl.float32) * sm_scale
    m_i = tl.max(tl.full((BLOCK_N,), float("-inf"), tl.float32), 0)
    l_v = tl.zeros((BLOCK_N,), tl.float32)
    a0 = tl.zeros((BLOCK_N, CP), tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    c0 = l_v
    c1 = l_v
    c2 = l_v
    c3 = l_v
    if split < n_split:  # a run of quantized blocks, BLOCK_N tokens a tile
        start = lo // G + split * blocks_per_split
        stop = tl.minimum(start + blocks_per_split, nq // G)
        kqb = kq_ptr + b * skq_b + hk * skq_h
        ksb = ks_ptr + b * sks_b + hk * sks_h
        kmb = km_ptr + b * sks_b + hk * sks_h
        vqb = vq_ptr + b * svq_b + hk * svq_h
        vsb = vs_ptr + b * svs_b + hk * svs_h
        vmb = vm_ptr + b * svs_b + hk * svs_h
        for t in range(start * TPB, stop * TPB):
            blk = t // TPB
            slot = (blk - blk_base) % n_block_slots
            offs_n = (t % TPB) * BLOCK_N + offs_t
            pos = blk * G + offs_n
            row = slot * G + offs_n
            valid = pos >= lo
            if HAS_MASK:
                mv = tl.load(mask_ptr + b * smask_b + pos, mask=pos < mask_len, other=0)
                valid = valid & (mv != 0)
            kb0 = _bytes(kqb, row, 0, CP, D, BITS, WORDS)
            vb0 = _bytes(vqb, row, 0, CP, D, BITS, WORDS)
            kb1 = kb0
            vb1 = vb0
            kb2 = kb0
            vb2 = vb0
            kb3 = kb0
            vb3 = vb0
            if not SHARED:
                if NP > 1:
                    kb1 = _bytes(kqb, row, 1, CP, D, BITS, WORDS)
                    vb1 = _bytes(vqb, row, 1, CP, D, BITS, WORDS)
                if NP > 2:
                    kb2 = _bytes(kqb, row, 2, CP, D, BITS, WORDS)
                    vb2 = _bytes(vqb, row, 2, CP, D, BITS, WORDS)
                    kb3 = _bytes(kqb, row, 3, CP, D, BITS, WORDS)
                    vb3 = _bytes(vqb, row, 3, CP, D, BITS, WORDS)
            qs0, k0 = _kscale(q0, ksb, kmb, slot, 0, CP, D, BITS)
            qs1 = qs0
            qs2 = qs0
            qs3 = qs0
            if NP > 1:
                qs1, k1 = _kscale(q1, ksb, kmb, slot, 1, CP, D, BITS)
                k0 += k1
            if NP > 2:
                qs2, k2 = _kscale(q2, ksb, kmb, slot, 2, CP, D, BITS)
                qs3, k3 = _kscale(q3, ksb, kmb, slot, 3, CP, D, BITS)
                k0 += k2 + k3
            raw = _kpart(k0[None, :], kb0, magic_base, qs0, 0, CP, D, BITS, WORDS)
            if NP > 1:
                raw = _kpart(raw, kb1, magic_base, qs1, 1, CP, D, BITS, WORDS)
            if NP > 2:
                raw = _kpart(raw, kb2, magic_base, qs2, 2, CP, D, BITS, WORDS)
                raw = _kpart(raw, kb3, magic_base, qs3, 3, CP, D, BITS, WORDS)
            if LAZY > 0:  # rescale only when the running maximum grows by more than LAZY (then p <= e^LAZY)
                s = tl.where(valid, tl.sum(raw, 1), float("-inf"))
                m_t = tl.max(s, 0)
                if m_t > m_i + LAZY:
                    alpha = tl.exp(m_i - m_t)
                    l_v *= alpha
                    a0 *= alpha
                    c0 *= alpha
                    if NP > 1:
                        a1 *= alpha
                        c1 *= alpha
                    if NP > 2:
                        a2 *= alpha
                        c2 *= alpha
                        a3 *= alpha
                        c3 *= alpha
                    m_i = m_t
                p = tl.exp(s - tl.where(m_i == float("-inf"), 0.0, m_i))
                alpha = 1.0
            else:
                p, alpha, m_i = _online(tl.sum(raw, 1), valid, m_i)
            l_v = l_v * alpha + p
            a0, c0 = _vpart(a0, c0, vb0, magic_base, p, alpha, vsb, vmb, row, 0, CP, D, BITS, GV,
                            LAZY > 0, WORDS)
            if NP > 1:
                a1, c1 = _vpart(a1, c1, vb1, magic_base, p, alpha, vsb, vmb, row, 1, CP, D, BITS, GV,
                                LAZY > 0, WORDS)
            if NP > 2:
                a2, c2 = _vpart(a2, c2, vb2, magic_base, p, alpha, vsb, vmb, row, 2, CP, D, BITS, GV,
                                LAZY > 0, WORDS)
                a3, c3 = _vpart(a3, c3, vb3, magic_base, p, alpha, vsb, vmb, row, 3, CP, D, BITS, GV,
                                LAZY > 0, WORDS)
    else:  # the full-precision window: positions max(nq, lo) .. L - 1
        r_lo = tl.maximum(nq, lo)
        rkb = rk_ptr + b * sr_b + hk * sr_h
        rvb = rv_ptr + b * sr_b + hk * sr_h
        for p0 in range(r_lo, L, BLOCK_N):
            pos = p0 + offs_t
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
            raw = tl.load(kp, mask=inside[:, None], other=0.0).to(tl.float32) * q0[None, :]
            if NP > 1:
                raw += tl.load(kp + CP, mask=inside[:, None], other=0.0).to(tl.float32) * q1[None, :]
            if NP > 2:
                raw += tl.load(kp + 2 * CP, mask=inside[:, None], other=0.0).to(tl.float32) * q2[None, :]
                raw += tl.load(kp + 3 * CP, mask=inside[:, None], other=0.0).to(tl.float32) * q3[None, :]
            p, alpha, m_i = _online(tl.sum(raw, 1), valid, m_i)
            l_v = l_v * alpha + p
            a0 = a0 * alpha + p[:, None] * tl.load(vp, mask=inside[:, None], other=0.0).to(tl.float32)
            if NP > 1:
                a1 = a1 * alpha + p[:, None] * tl.load(vp + CP, mask=inside[:, None], other=0.0).to(tl.float32)
            if NP > 2:
                a2 = a2 * alpha + p[:, None] * tl.load(vp + 2 * CP, mask=inside[:, None], other=0.0).to(tl.float32)
                a3 = a3 * alpha + p[:, None] * tl.load(vp + 3 * CP, mask=inside[:, None], other=0.0).to(tl.float32)
    l_i = tl.sum(l_v, 0)
    _store(o_ptr, a0, tl.sum(c0, 0), l_i, b, hk, split, 0, CP, D, so_b, so_h)
    if NP > 1:
        _store(o_ptr, a1, tl.sum(c1, 0), l_i, b, hk, split, 1, CP, D, so_b, so_h)
    if NP > 2:
        _store(o_ptr, a2, tl.sum(c2, 0), l_i, b, hk, split, 2, CP, D, so_b, so_h)
        _store(o_ptr, a3, tl.sum(c3, 0), l_i, b, hk, split, 3, CP, D, so_b, so_h)
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + b * sl_b + hk * sl_h + split, lse)
