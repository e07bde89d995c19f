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
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, ticket_ptr, M, N, K, SPLIT_K,
                stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
                FMT: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr):
    """``GROUP == 0``: one scale per output row. ``SPLIT``: ``SPLIT_K > 1`` (the split count is a run-time
    argument, so one compiled kernel serves every split)."""
    NG: tl.constexpr = BLOCK_K // GROUP if (GROUP > 0 and BLOCK_K >= GROUP) else 1  # groups per K tile
    GS: tl.constexpr = BLOCK_K // NG
    BB: tl.constexpr = BLOCK_K // 2 if FMT == 4 else BLOCK_K  # bytes of a row in a tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    rn_s = tl.where(mask_n, rn, 0)  # clamped rows: unmasked (vectorized) loads, masked store
    rm = tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rb = tl.arange(0, BB)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, NG)
    n_tiles = K // BLOCK_K
    per = tl.cdiv(n_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per + per, n_tiles)
    dt = x_ptr.dtype.element_ty
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for t in range(pid_k * per, t_end):
        k0 = t * BLOCK_K
        g = (k0 + rg * GS) // GROUP if GROUP > 0 else rg * 0  # (NG,)
        wp = w_ptr + rn_s[:, None] * stride_wn + (k0 // (2 if FMT == 4 else 1) + rb)[None, :]
        if FMT == 9:
            f = tl.load(wp).to(tl.float32)
        elif FMT == 8:
            f = _f32((tl.load(wp).to(tl.int32) ^ 128) & 255)  # q + 128
        else:
            wb = tl.load(wp).to(tl.int32)
            hi = _f32(wb & 240)  # 16 q_even, in place
            lo = _f32(wb & 15)  # q_odd
        s = tl.load(s_ptr + rn_s[:, None] * stride_sn + g[None, :] * stride_sg).to(tl.float32)  # (BN, NG)
        if FMT == 4 and HAS_Z:
            zb = tl.load(z_ptr + (rn_s[:, None] // 2) * stride_zn + g[None, :] * stride_zg)
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
    if DOT:
        out = acc
    else:
        out = tl.sum(acc, 1)[None, :]  # (1, BLOCK_N)
    omask = mask_m[:, None] & mask_n[None, :]
    if not SPLIT:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        pofs = rm[:, None] * N + rn_s[None, :]
        tl.store(part_ptr + pid_k * M * N + pofs, out, mask=omask)
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # last one in: sum the partials in split order, re-arm the ticket
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in range(0, SPLIT_K):
                total += tl.load(part_ptr + sk * M * N + pofs, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)
