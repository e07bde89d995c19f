"""Decode GEMV of the weight-only formats: ``y (M, N) = x (M, K) @ dequant(W)^T`` for M = 1..16 (Triton).

Memory-bound by design: every weight byte is read once, in 16-byte vectors, and nothing else of size N x K
crosses the bus. Formats (``FMT``):

* ``4``: int4 codes two a byte ``(N, K/2)`` (even k in the high nibble); zero points either packed
  nibbles (``HAS_Z``) or the symmetric offset 8.
* ``8``: int8 codes ``(N, K)`` (sign bit flipped: unsigned codes with offset 128).
* ``9``: float8 e4m3 codes ``(N, K)`` (the w8a8-fp8 weights at decode), hardware conversion.

All tiles are 2-D ``(rows, bytes)`` as loaded (16-byte vectors per thread): no 3-D broadcasts or reshapes of
the weight tile, which cost layout conversions through shared memory (measured: 0.5 TB/s).

Scales (and packed zero points) are addressed by strides, so the row-major ``(N, G)`` layout of old
checkpoints and the group-major ``(G, N)`` layout written at quantize time (one coalesced row of scales
per group) both work; ``GROUP == K`` is one scale per output row.

Integer codes become floats without an int->float conversion instruction (a quarter-rate unit on Hopper):
the code's bits are OR-ed into the mantissa of 2^23 and 2^23 is subtracted, leaving the code exactly. The
high nibble is used in place (``(b & 0xF0) | 2^23`` gives 16 q) and its activations are pre-scaled by 1/16
(exact). Per element that is about one logic op, one add and one FMA (``FMA`` path, M = 1), or a 16-bit
operand of a tensor-core ``tl.dot`` (``DOT`` path, M <= 16, one group per K tile). Scales and zero points
are applied once per group to the partial sums: ``sum_k x (q - z) s = s (sum_k x q - z sum_k x)``.

Split-K (``SPLIT_K > 1``) fills the GPU on tall matrices (the MLP down projection): each program writes a
float32 partial, and the last program of each column block (an atomic ticket) sums them in a fixed order,
writes the output and re-arms the ticket, so one launch does it all, deterministically, with no zero-fill.

Several weights that read the same activations (q/k/v, gate/up: ``NW`` = 2 or 3) run in one launch, as in
:func:`.triton_decode.decode_kernel`: each program picks its weight's pointers from its row-block index, so
the launch costs what one stacked matrix of the same bytes does (on the H100: w8 q/k/v as three launches
3 x 11.2 us, the stacked matrix 25.9 us). The loop body is :func:`_tile_load` + :func:`_tile_step`.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)  # bits of 2^23 as float32
FLIP8 = tl.constexpr(-2139062144)  # 0x80808080 as int32: flips the sign bit of each byte (int8 -> uint8 + 128)


@triton.jit
def _f32(bits):
    """Exact float of the small integer OR-ed into the mantissa of 2^23."""
    return (bits | MAGIC).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def select_weight(pid_n, N, w_ptr, s_ptr, z_ptr, stride_sg, stride_zg, w1_ptr, s1_ptr, z1_ptr, sg1, zg1, N0,
                  w2_ptr, s2_ptr, z2_ptr, sg2, zg2, N1, BLOCK_N: tl.constexpr, NW: tl.constexpr):
    """Which of ``NW`` (1..3) weights side by side in ``y`` row block ``pid_n`` reads (weight 0 has ``N0`` rows,
    weight 1 ``N1``, weight 2 the rest; row blocks never straddle weights): its local row block, its row count,
    its first column in ``y``, and its codes / scales / zeros pointers and group strides. Shared by the decode
    GEMVs (``decode_kernel`` and ``gemv_kernel``)."""
    if NW == 1:
        return pid_n, N, 0, w_ptr, s_ptr, z_ptr, stride_sg, stride_zg
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    in0 = pid_n < nb0
    in1 = pid_n < nb0 + nb1
    lb = tl.where(in0, pid_n, tl.where(in1, pid_n - nb0, pid_n - nb0 - nb1))
    n_loc = tl.where(in0, N0, tl.where(in1, N1, N - N0 - N1))
    off = tl.where(in0, 0, tl.where(in1, N0, N0 + N1))
    wp = tl.where(in0, w_ptr, tl.where(in1, w1_ptr, w2_ptr))
    sp = tl.where(in0, s_ptr, tl.where(in1, s1_ptr, s2_ptr))
    zp = tl.where(in0, z_ptr, tl.where(in1, z1_ptr, z2_ptr))
    sg = tl.where(in0, stride_sg, tl.where(in1, sg1, sg2))
    zg = tl.where(in0, stride_zg, tl.where(in1, zg1, zg2))
    return lb, n_loc, off, wp, sp, zp, sg, zg


@triton.jit
def _tile_load(wp, sp, zp, rn_s, rb, rg, t, stride_wn, stride_sn, sg, stride_zn, zg, FMT: tl.constexpr,
               GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr):
    """Codes ``(BLOCK_N, BB)``, scales and packed zero bytes ``(BLOCK_N, NG)`` of K tile ``t``, as stored."""
    k0 = t * BLOCK_K
    g = (k0 + rg * GS) // GROUP if GROUP > 0 else rg * 0  # (NG,)
    wraw = tl.load(wp + rn_s[:, None] * stride_wn + (k0 // (2 if FMT == 4 else 1) + rb)[None, :])
    sraw = tl.load(sp + rn_s[:, None] * stride_sn + g[None, :] * sg)
    if FMT == 4 and HAS_Z:
        zraw = tl.load(zp + (rn_s[:, None] // 2) * stride_zn + g[None, :] * zg)
    else:
        zraw = sraw  # unused
    return wraw, sraw, zraw


@triton.jit
def _tile_step(acc, wraw, sraw, zraw, t, x_ptr, stride_xm, rm, mask_m, rk, rn_s, FMT: tl.constexpr,
               HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               NG: tl.constexpr, GS: tl.constexpr, BB: tl.constexpr, DOT: tl.constexpr):
    """``acc`` plus K tile ``t``: the codes as floats, times the activations, scales and zeros per group."""
    k0 = t * BLOCK_K
    dt = x_ptr.dtype.element_ty
    if FMT == 9:
        f = wraw.to(tl.float32)
    elif FMT == 8:
        f = _f32((wraw.to(tl.int32) ^ 128) & 255)  # q + 128
    else:
        wb = wraw.to(tl.int32)
        hi = _f32(wb & 240)  # 16 q_even, in place
        lo = _f32(wb & 15)  # q_odd
    s = sraw.to(tl.float32)  # (BN, NG)
    if FMT == 4 and HAS_Z:
        zb = zraw.to(tl.int32)
        z = tl.where(rn_s[:, None] % 2 == 0, zb >> 4, zb & 15).to(tl.float32)
    elif FMT == 4:
        z = tl.full((BLOCK_N, NG), 8.0, tl.float32)
    elif FMT == 8:
        z = tl.full((BLOCK_N, NG), 128.0, tl.float32)
    else:
        z = tl.zeros((BLOCK_N, NG), tl.float32)
    if DOT:  # one group per tile (NG == 1): acc += s (x @ q^T - z sum(x))
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mask_m[:, None], other=0.0)
        xsum = tl.sum(xt.to(tl.float32), 1)
        if FMT == 4:
            xe, xo = tl.split(tl.reshape(xt, (BLOCK_M, BB, 2)))
            part = tl.dot((xe.to(tl.float32) * 0.0625).to(dt), tl.trans(hi.to(dt)))
            part = tl.dot(xo, tl.trans(lo.to(dt)), part)
        else:
            part = tl.dot(xt, tl.trans(f.to(dt)))
        acc += (part - xsum[:, None] * tl.reshape(z, (1, BLOCK_N))) * tl.reshape(s, (1, BLOCK_N))
    else:  # M == 1: element-wise FMA, one reduction per group
        xk = tl.load(x_ptr + k0 + rk).to(tl.float32)
        xsum = tl.sum(tl.reshape(xk, (NG, GS)), 1)
        if FMT == 4:
            xe, xo = tl.split(tl.reshape(xk, (BB, 2)))
            prod = hi * (xe * 0.0625)[None, :] + lo * xo[None, :]
        else:
            prod = f * xk[None, :]
        part = tl.sum(tl.reshape(prod, (BLOCK_N, NG, BB // NG)), 2)
        acc += (part - z * xsum[None, :]) * s
    return acc


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, ticket_ptr, M, N, K, SPLIT_K,
                stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
                w1_ptr, s1_ptr, z1_ptr, sg1, zg1, N0, w2_ptr, s2_ptr, z2_ptr, sg2, zg2, N1,
                FMT: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
                NW: tl.constexpr):
    """``GROUP == 0``: one scale per output row. ``SPLIT``: ``SPLIT_K > 1`` (the split count is a run-time
    argument, so one compiled kernel serves every split).

    ``NW`` = 2 or 3: several weights of the same K, format, group and row strides in one launch (q/k/v,
    gate/up), their outputs side by side in ``y (M, N)``: weight 0 (``w_ptr``, ``s_ptr``, ``z_ptr``) has ``N0``
    rows, weight 1 (``w1_ptr``...) ``N1``, weight 2 the rest; each has its own pointers and group strides of
    its scales / zeros (``sg1``, ``zg1``...). Each program reads one weight (row blocks do not straddle
    weights), chosen from its block index; split-K partials and tickets are indexed over the whole launch."""
    NG: tl.constexpr = BLOCK_K // GROUP if (GROUP > 0 and BLOCK_K >= GROUP) else 1  # groups per K tile
    GS: tl.constexpr = BLOCK_K // NG
    BB: tl.constexpr = BLOCK_K // 2 if FMT == 4 else BLOCK_K  # bytes of a row in a tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    lb, n_loc, off, wp, sp, zp, sg, zg = select_weight(pid_n, N, w_ptr, s_ptr, z_ptr, stride_sg, stride_zg, w1_ptr,
                                                       s1_ptr, z1_ptr, sg1, zg1, N0, w2_ptr, s2_ptr, z2_ptr, sg2,
                                                       zg2, N1, BLOCK_N, NW)
    rn = lb * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of the selected weight
    mask_n = rn < n_loc
    rn_s = tl.where(mask_n, rn, 0)  # clamped rows: unmasked (vectorized) loads, masked store
    rm = tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rb = tl.arange(0, BB)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, NG)
    n_tiles = K // BLOCK_K
    per = tl.cdiv(n_tiles, SPLIT_K)
    t0 = pid_k * per
    t_end = tl.minimum(t0 + per, n_tiles)
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for t in range(t0, t_end):
        wraw, sraw, zraw = _tile_load(wp, sp, zp, rn_s, rb, rg, t, stride_wn, stride_sn, sg, stride_zn, zg, FMT, GROUP,
                                      HAS_Z, BLOCK_K, GS)
        acc = _tile_step(acc, wraw, sraw, zraw, t, x_ptr, stride_xm, rm, mask_m, rk, rn_s, FMT, HAS_Z, BLOCK_M,
                         BLOCK_N, BLOCK_K, NG, GS, BB, DOT)
    if DOT:
        out = acc
    else:
        out = tl.sum(acc, 1)[None, :]  # (1, BLOCK_N)
    omask = mask_m[:, None] & mask_n[None, :]
    if not SPLIT:
        tl.store(y_ptr + rm[:, None] * stride_ym + off + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        pofs = rm[:, None] * N + off + rn_s[None, :]
        tl.store(part_ptr + pid_k * M * N + pofs, out, mask=omask)
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # last one in: sum the partials in split order, re-arm the ticket
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in range(0, SPLIT_K):
                total += tl.load(part_ptr + sk * M * N + pofs, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + rm[:, None] * stride_ym + off + rn[None, :], total.to(y_ptr.dtype.element_ty),
                     mask=omask)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)
