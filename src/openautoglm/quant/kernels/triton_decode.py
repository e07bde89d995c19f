"""Decode GEMV for a few rows of activations: ``y (M, N) = x (M, K) @ dequant(W)^T``, M = 1..BLOCK_M (Triton).

Bound by reading the weights, so the design is about bytes in flight and instructions per weight:

* Tiles are 4-D ``(R, RB, T, E)``: ``RB`` rows spread over the CTA's threads, ``R`` more rows per thread,
  ``T`` threads along K, ``E`` codes' worth of bytes per thread (16 bytes for int4, 8 for int8/e4m3). The
  activation tiles are ``(1, RB, T, E')`` with the same per-thread shape, so the compiler gives them the
  weights' register layout: no layout conversions through shared memory, and a thread reuses its
  activations for its ``R`` rows.
* Every product is summed inside the thread (over ``E`` and over the loop); threads are combined once, at
  the end. Scales and zero points are applied per group to the thread's partial sums:
  ``sum_k x (q - z) s = s (sum_k x q - z sum_k x)``.
* int4 (``FMT=4``) uses the ``"k32"`` packing (:func:`..math.pack_int4_k32`): in each 32-code block, the
  little-endian int32 word ``w`` holds code ``4 p + w`` in nibble ``p``. So nibble ``p`` of a thread's four
  words covers 4 consecutive k (one 8-byte activation load), and turning it into a float is one shift and
  one ``lop3``: the nibble is moved to bits 16..19 and OR-ed into 128.0, giving ``128 + q`` exactly (the
  128 is taken off through the activation sums; float32 keeps 17 of its 24 bits for the code part).
* int8 (``FMT=8``: codes ``q``, unsigned ``q + 128`` via a sign flip) and e4m3 (``FMT=9``, hardware
  conversion) read their natural row-major bytes.
* ``SPLIT_K > 1``: programs along K write float32 partials; the last one of each row block (an atomic
  ticket) sums them in a fixed order, writes ``y`` and re-arms the ticket (deterministic, one launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gemv import select_weight

BIAS = tl.constexpr(0x43000000)  # float32 128.0: a nibble at bits 16..19 reads as 128 + nibble


@triton.jit
def _nib(w, p: tl.constexpr, mask16):
    """Float32 ``128 + nibble p`` of each int32 word: one shift and one lop3 (``mask16`` = 0x000F0000 is a
    kernel argument, so the lop3 reads it from the constant bank instead of a register rebuilt per use)."""
    sh: tl.constexpr = 16 - 4 * p
    if sh > 0:
        v = w << sh
    elif sh < 0:
        v = w >> (-sh)
    else:
        v = w
    return ((v & mask16) | BIAS).to(tl.float32, bitcast=True)


@triton.jit
def _codes(wv, p: tl.constexpr, FMT: tl.constexpr, mask16, xor15):
    """Float32 ``c + q`` of the codes in ``wv`` (``p``: nibble of the int32 words, int4 only):
    int4 ``128 + q``; int8 ``2^15 (256 + q + 128)`` (x is pre-scaled by 2^-15); e4m3 the value."""
    if FMT == 4:
        return _nib(wv, p, mask16)
    elif FMT == 8:
        return ((wv.to(tl.int32) << 15) ^ xor15).to(tl.float32, bitcast=True)
    else:
        return wv.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _term(f, xp, raw, xs, m: tl.constexpr, M, XSCALE: tl.constexpr):
    if m == 0:  # M >= 1 always: no mask
        xv = tl.load(xp).to(tl.float32)
    else:
        xv = tl.load(xp, mask=(xs * 0.0 + m) < M, other=0.0).to(tl.float32)
    if XSCALE != 1.0:
        xv = xv * XSCALE
    return raw + f * xv, xs + xv


@triton.jit
def _finish(raw, xs, zz, s, acc, GROUP: tl.constexpr):
    """``acc += s (sum (c + q) x - (c + z) sum x)`` for one activation row, summed inside the thread."""
    part = tl.sum(raw, 4) - zz * tl.sum(xs, 4)
    if GROUP > 0:
        part = part * s
    return acc + part


@triton.jit
def _finish_all(r0, r1, r2, r3, r4, r5, r6, r7, x0, x1, x2, x3, x4, x5, x6, x7, zz, s,
                a0, a1, a2, a3, a4, a5, a6, a7, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    a0 = _finish(r0, x0, zz, s, a0, GROUP)
    if BLOCK_M > 1:
        a1 = _finish(r1, x1, zz, s, a1, GROUP)
    if BLOCK_M > 2:
        a2 = _finish(r2, x2, zz, s, a2, GROUP)
        a3 = _finish(r3, x3, zz, s, a3, GROUP)
    if BLOCK_M > 4:
        a4 = _finish(r4, x4, zz, s, a4, GROUP)
        a5 = _finish(r5, x5, zz, s, a5, GROUP)
        a6 = _finish(r6, x6, zz, s, a6, GROUP)
        a7 = _finish(r7, x7, zz, s, a7, GROUP)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _store(acc, m, M, y_ptr, stride_ym, part_ptr, s_ptr, stride_sn, rows3, n_loc, off, N, pid_k,
           GROUP: tl.constexpr, SPLIT: tl.constexpr, TAX: tl.constexpr):
    """Row ``m`` of the output: local rows ``rows3`` of the selected weight, at column ``off + rows3``."""
    out = tl.sum(acc, TAX)                                     # threads along K combined
    ok = (rows3 < n_loc) & ((rows3 * 0 + m) < M)
    if SPLIT:
        tl.store(part_ptr + (pid_k * M + m) * N + off + rows3, out, mask=ok)
    else:
        if GROUP == 0:
            out = out * tl.load(s_ptr + tl.where(rows3 < n_loc, rows3, 0) * stride_sn).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + off + rows3, out.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def decode_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, ticket_ptr, M, N, K, SPLIT_K,
                  stride_xm, stride_wv, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, mask16, xor15,
                  w1_ptr, s1_ptr, z1_ptr, sg1, zg1, N0, w2_ptr, s2_ptr, z2_ptr, sg2, zg2, N1,
                  idx_ptr, stride_we, stride_se, stride_ze, XDIV,
                  FMT: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr,
                  R: tl.constexpr, RB: tl.constexpr, T: tl.constexpr, SPLIT: tl.constexpr,
                  ASCENDING: tl.constexpr, NW: tl.constexpr, PF: tl.constexpr, EXPERTS: tl.constexpr):
    """``stride_wv``: row stride of the codes in 16-byte vectors (int4) or 8-byte vectors (int8/e4m3).
    ``GROUP == 0``: one scale per output row. ``BLOCK_M`` in 1, 2, 4, 8: activation rows (``M <= BLOCK_M``);
    the codes are converted once and used for every row. ``mask16 = 0x000F0000``, ``xor15 = 0x4B400000``.
    ``ASCENDING``: Triton before 3.7 orders tied (non-contiguous) axes of a load by ascending index when it
    spreads threads over them, later versions by descending index; the tile axes are permuted to match, so
    threads go along T, then RB, and R stays inside each thread for both the codes and the activations
    (otherwise the compiler converts layouts through shared memory on every iteration).
    ``NW`` = 2 or 3: several weights of the same K and format in one launch (q/k/v, gate/up), their outputs side
    by side in ``y (M, N)``: weight 0 has ``N0`` rows, weight 1 ``N1``, weight 2 the rest; each program reads
    one weight (row blocks do not straddle weights), chosen from its block index.
    ``PF = 1``: software prefetch: the codes (and group scales/zeros) of iteration ``it + 1`` are loaded before
    iteration ``it`` is computed, so every thread has two iterations of weights in flight (the loop is
    otherwise latency bound: one load, then a long chain of conversions and FMAs that waits for it).
    ``EXPERTS``: a grouped GEMV over routed experts (MoE decode, :mod:`.ops_moe`): the weights are a stack of experts
    (expert ``e``'s codes / scales / zeros at ``e * stride_we`` / ``stride_se`` / ``stride_ze`` elements), program
    ``(., ., p)`` computes pair ``p``: expert ``idx_ptr[p]`` (read on the device) times activation row ``p // XDIV``
    (``XDIV`` = top-k for the first projection, whose input is the token; 1 for the second), into ``y`` row ``p``.
    One activation row per program (``BLOCK_M`` = 1, ``M`` = 1), no split."""
    E: tl.constexpr = 4 if FMT == 4 else 8            # int32 words (int4) or bytes per thread per row
    KT: tl.constexpr = 32 if FMT == 4 else 8          # k per thread per row per iteration
    KB: tl.constexpr = KT * T                         # k per row per iteration
    NT: tl.constexpr = 8 if FMT == 4 else 1           # terms (nibbles of a word) per iteration
    XS: tl.constexpr = 1.0 / 32768.0 if FMT == 8 else 1.0
    C: tl.constexpr = 128.0 if FMT == 4 else (384.0 * 32768.0 if FMT == 8 else 0.0)  # code offset (x scaled)
    BLOCK_N: tl.constexpr = R * RB
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if EXPERTS:  # this program's (token, expert) pair: pointers into the expert's slice of the stacks
        pair = tl.program_id(2)
        ex = tl.load(idx_ptr + pair).to(tl.int64)
        w_ptr += ex * stride_we
        s_ptr += ex * stride_se
        z_ptr += ex * stride_ze
        x_ptr += (pair // XDIV).to(tl.int64) * stride_xm
        y_ptr += pair.to(tl.int64) * stride_ym
    # Tile axes (see ASCENDING): (1, R, RB, T, E) or (T, RB, R, 1, E); E is always last (the vector)
    if ASCENDING:
        t5 = tl.arange(0, T)[:, None, None, None, None]
        rb5 = tl.arange(0, RB)[None, :, None, None, None]
        r5 = tl.arange(0, R)[None, None, :, None, None]
        TAX: tl.constexpr = 0
    else:
        r5 = tl.arange(0, R)[None, :, None, None, None]
        rb5 = tl.arange(0, RB)[None, None, :, None, None]
        t5 = tl.arange(0, T)[None, None, None, :, None]
        TAX: tl.constexpr = 3
    e5 = tl.arange(0, E)[None, None, None, None, :]
    lb, n_loc, off, wp, sp, zp, sg, zg = select_weight(pid_n, N, w_ptr, s_ptr, z_ptr, stride_sg, stride_zg, w1_ptr,
                                                       s1_ptr, z1_ptr, sg1, zg1, N0, w2_ptr, s2_ptr, z2_ptr, sg2,
                                                       zg2, N1, BLOCK_N, NW)
    rows = lb * BLOCK_N + r5 * RB + rb5                         # rows of the selected weight
    orow = tl.max(tl.sum(rows + t5 * 0, 4), TAX)              # output rows, in the layout of the results
    rows_s = tl.where(rows < n_loc, rows, 0)                   # clamped: unmasked vector loads
    n_it = K // KB
    per = tl.cdiv(n_it, SPLIT_K)
    it0 = pid_k * per
    it1 = tl.minimum(it0 + per, n_it)
    if FMT == 4:
        wbase = wp.to(tl.pointer_type(tl.int32)) + rows_s * (stride_wv * 4) + t5 * 4 + e5
    else:
        wbase = wp.to(tl.pointer_type(tl.uint8)) + rows_s * (stride_wv * 8) + t5 * 8 + e5
    # activations: the codes' tile without the R axis; every row of threads reads the same addresses
    xbase = x_ptr + rb5 * 0 + t5 * KT + e5
    zero4 = tl.sum((rows + t5 + e5) * 0.0, 4)
    a0 = zero4
    a1 = zero4
    a2 = zero4
    a3 = zero4
    a4 = zero4
    a5 = zero4
    a6 = zero4
    a7 = zero4
    ZZ: tl.constexpr = C + 8.0 if (FMT == 4 and not HAS_Z) else C  # symmetric int4 codes are stored + 8
    # per-thread partial sums of (c + q) x and of x; one scale per row (GROUP == 0): kept over the whole loop
    rz = (rows + t5 + e5) * 0.0
    xz = (rb5 + t5 + e5) * 0.0
    r0, r1, r2, r3, r4, r5_, r6, r7 = rz, rz, rz, rz, rz, rz, rz, rz
    x0, x1, x2, x3, x4, x5, x6, x7 = xz, xz, xz, xz, xz, xz, xz, xz
    if PF:
        i_first = tl.minimum(it0, n_it - 1)  # an empty split still reads in bounds
        wv_n = tl.load(wbase + i_first * (T * E))
        if GROUP > 0:
            g_n = (i_first * KB + t5 * KT) // GROUP
            sraw_n = tl.load(sp + rows_s * stride_sn + g_n * sg)
            if HAS_Z:
                zraw_n = tl.load(zp + (rows_s // 2) * stride_zn + g_n * zg)
    for it in range(it0, it1):
        k0 = it * KB
        if PF:  # take this iteration's prefetched codes/scales, issue the next iteration's loads
            wv = wv_n
            i_next = tl.minimum(it + 1, it1 - 1)
            wv_n = tl.load(wbase + i_next * (T * E))
            if GROUP > 0:
                sraw = sraw_n
                g_n = (i_next * KB + t5 * KT) // GROUP
                sraw_n = tl.load(sp + rows_s * stride_sn + g_n * sg)
                if HAS_Z:
                    zraw = zraw_n
                    zraw_n = tl.load(zp + (rows_s // 2) * stride_zn + g_n * zg)
        else:
            wv = tl.load(wbase + it * (T * E))
            if GROUP > 0:
                g = (k0 + t5 * KT) // GROUP
                sraw = tl.load(sp + rows_s * stride_sn + g * sg)
                if HAS_Z:
                    zraw = tl.load(zp + (rows_s // 2) * stride_zn + g * zg)
        zz = ZZ
        s = 1.0
        if GROUP > 0:
            s = tl.sum(sraw.to(tl.float32), 4)
            if HAS_Z:
                zb = zraw.to(tl.int32)
                zz = C + tl.sum(tl.where(rows_s % 2 == 0, zb >> 4, zb & 15).to(tl.float32), 4)
        if GROUP > 0:  # per group: partial sums restart every iteration
            r0, r1, r2, r3, r4, r5_, r6, r7 = rz, rz, rz, rz, rz, rz, rz, rz
            x0, x1, x2, x3, x4, x5, x6, x7 = xz, xz, xz, xz, xz, xz, xz, xz
        for p in tl.static_range(NT):
            f = _codes(wv, p, FMT, mask16, xor15)
            xp = xbase + (k0 + 4 * p)
            r0, x0 = _term(f, xp, r0, x0, 0, M, XS)
            if BLOCK_M > 1:
                r1, x1 = _term(f, xp + stride_xm, r1, x1, 1, M, XS)
            if BLOCK_M > 2:
                r2, x2 = _term(f, xp + 2 * stride_xm, r2, x2, 2, M, XS)
                r3, x3 = _term(f, xp + 3 * stride_xm, r3, x3, 3, M, XS)
            if BLOCK_M > 4:
                r4, x4 = _term(f, xp + 4 * stride_xm, r4, x4, 4, M, XS)
                r5_, x5 = _term(f, xp + 5 * stride_xm, r5_, x5, 5, M, XS)
                r6, x6 = _term(f, xp + 6 * stride_xm, r6, x6, 6, M, XS)
                r7, x7 = _term(f, xp + 7 * stride_xm, r7, x7, 7, M, XS)
        if GROUP > 0:
            a0, a1, a2, a3, a4, a5, a6, a7 = _finish_all(r0, r1, r2, r3, r4, r5_, r6, r7, x0, x1, x2, x3, x4, x5,
                                                         x6, x7, zz, s, a0, a1, a2, a3, a4, a5, a6, a7, BLOCK_M, GROUP)
    if GROUP == 0:
        a0, a1, a2, a3, a4, a5, a6, a7 = _finish_all(r0, r1, r2, r3, r4, r5_, r6, r7, x0, x1, x2, x3, x4, x5,
                                                     x6, x7, ZZ, 1.0, a0, a1, a2, a3, a4, a5, a6, a7, BLOCK_M, GROUP)
    rows3 = orow
    _store(a0, 0, M, y_ptr, stride_ym, part_ptr, sp, stride_sn, rows3, n_loc, off, N, pid_k, GROUP, SPLIT, TAX)
    if BLOCK_M > 1:
        _store(a1, 1, M, y_ptr, stride_ym, part_ptr, sp, stride_sn, rows3, n_loc, off, N, pid_k, GROUP, SPLIT, TAX)
    if BLOCK_M > 2:
        _store(a2, 2, M, y_ptr, stride_ym, part_ptr, sp, stride_sn, rows3, n_loc, off, N, pid_k, GROUP, SPLIT, TAX)
        _store(a3, 3, M, y_ptr, stride_ym, part_ptr, sp, stride_sn, rows3, n_loc, off, N, pid_k, GROUP, SPLIT, TAX)
    if BLOCK_M > 4:
        _store(a4, 4, M, y_ptr, stride_ym, part_ptr, sp, stride_sn, rows3, n_loc, off, N, pid_k, GROUP, SPLIT, TAX)
        _store(a5, 5, M, y_ptr, stride_ym, part_ptr, sp, stride_sn, rows3, n_loc, off, N, pid_k, GROUP, SPLIT, TAX)
        _store(a6, 6, M, y_ptr, stride_ym, part_ptr, sp, stride_sn, rows3, n_loc, off, N, pid_k, GROUP, SPLIT, TAX)
        _store(a7, 7, M, y_ptr, stride_ym, part_ptr, sp, stride_sn, rows3, n_loc, off, N, pid_k, GROUP, SPLIT, TAX)
    if SPLIT:
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # last one in: sum the partials in split order, re-arm the ticket
            ms = tl.arange(0, BLOCK_M)[:, None]
            rows2 = lb * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            omask = (ms < M) & (rows2 < n_loc)
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in range(0, SPLIT_K):
                total += tl.load(part_ptr + (sk * M + ms) * N + off + rows2, mask=omask, other=0.0,
                                 cache_modifier=".cg")
            if GROUP == 0:
                total = total * tl.load(sp + tl.where(rows2 < n_loc, rows2, 0) * stride_sn).to(tl.float32)
            tl.store(y_ptr + ms * stride_ym + off + rows2, total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)


@triton.jit
def _dot_load(wbase, s_ptr, z_ptr, rn_s, it, stride_sn, stride_sg, stride_zn, stride_zg, FMT: tl.constexpr,
              GROUP: tl.constexpr, HAS_Z: tl.constexpr, TW: tl.constexpr, KB: tl.constexpr):
    """Codes ``(BLOCK_N, TW)`` int32, scales and packed zero bytes ``(BLOCK_N,)`` of iteration ``it``."""
    wv = tl.load(wbase + it * TW)
    g = (it * KB) // GROUP if GROUP > 0 else 0
    sraw = tl.load(s_ptr + rn_s * stride_sn + g * stride_sg)
    if FMT == 4 and HAS_Z:
        zraw = tl.load(z_ptr + (rn_s // 2) * stride_zn + g * stride_zg)
    else:
        zraw = sraw  # unused
    return wv, sraw, zraw


@triton.jit
def _dot_step(acc, wv, sraw, zraw, it, x_ptr, stride_xm, rm, mm, rj, rn_s, FMT: tl.constexpr, HAS_Z: tl.constexpr,
              BLOCK_N: tl.constexpr, TW: tl.constexpr, KB: tl.constexpr):
    k0 = it * KB
    dt = x_ptr.dtype.element_ty
    s = sraw.to(tl.float32)
    if FMT == 4:
        if HAS_Z:
            zb = zraw.to(tl.int32)
            z = tl.where(rn_s % 2 == 0, zb >> 4, zb & 15).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 8.0, tl.float32)
        off = 8388608.0 + z
        for p in tl.static_range(8):
            q = (((wv >> (4 * p)) & 15) | 0x4B000000).to(tl.float32, bitcast=True)
            wt = ((q - off[:, None]) * s[:, None]).to(dt)          # (BLOCK_N, TW), exact (q - z) s
            kx = k0 + (rj // 4) * 32 + 4 * p + (rj % 4)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + kx[None, :], mask=mm[:, None], other=0.0)
            acc = tl.dot(xt, tl.trans(wt), acc)
    else:
        for b in tl.static_range(4):
            byte = (wv >> (8 * b)) & 255
            if FMT == 8:
                q = ((byte ^ 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # int8 code
            else:
                q = byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            wt = (q * s[:, None]).to(dt)
            kx = k0 + rj * 4 + b
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + kx[None, :], mask=mm[:, None], other=0.0)
            acc = tl.dot(xt, tl.trans(wt), acc)
    return acc


@triton.jit
def decode_dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, ticket_ptr, M, N, K, SPLIT_K,
                      stride_xm, stride_wv, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
                      FMT: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_N: tl.constexpr,
                      TW: tl.constexpr, SPLIT: tl.constexpr):
    """Tensor-core variant for 2..16 activation rows: the codes are dequantized to ``(q - z) s`` in 16 bits
    (bit-identical to the reference dequantization) and fed to ``tl.dot`` against the activations padded
    to 16 rows, so the arithmetic per weight does not grow with M. ``TW``: int32 words of codes per row per
    iteration (int4: 8 codes a word, the ``k32`` order: nibble ``p`` of a word is one ``tl.dot`` over
    ``TW`` codes; int8/e4m3: 4 bytes a word, natural order). One group per iteration (``8 TW <= GROUP``)."""
    CW: tl.constexpr = 8 if FMT == 4 else 4            # codes per int32 word
    KB: tl.constexpr = CW * TW                         # k per row per iteration
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_s = tl.where(rn < N, rn, 0)
    rm = tl.arange(0, 16)
    mm = rm < M
    rj = tl.arange(0, TW)
    n_it = K // KB
    per = tl.cdiv(n_it, SPLIT_K)
    it0 = pid_k * per
    it1 = tl.minimum(it0 + per, n_it)
    wbase = w_ptr.to(tl.pointer_type(tl.int32)) + rn_s[:, None] * (stride_wv * 4) + rj[None, :]
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for it in range(it0, it1):
        wv, sraw, zraw = _dot_load(wbase, s_ptr, z_ptr, rn_s, it, stride_sn, stride_sg, stride_zn, stride_zg, FMT,
                                   GROUP, HAS_Z, TW, KB)
        acc = _dot_step(acc, wv, sraw, zraw, it, x_ptr, stride_xm, rm, mm, rj, rn_s, FMT, HAS_Z, BLOCK_N, TW, KB)
    rm2 = rm[:, None]
    rn2 = rn[None, :]
    omask = (rm2 < M) & (rn2 < N)
    if not SPLIT:
        tl.store(y_ptr + rm2 * stride_ym + rn2, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        pofs = rm2 * N + rn2
        tl.store(part_ptr + pid_k * M * N + pofs, acc, mask=omask)
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            for sk in range(0, SPLIT_K):
                total += tl.load(part_ptr + sk * M * N + pofs, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + rm2 * stride_ym + rn2, total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)
