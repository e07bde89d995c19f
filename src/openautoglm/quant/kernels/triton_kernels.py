"""Triton kernels of the quantized Linear layers besides the GEMV/GEMM (CUDA; ``TRITON_INTERPRET=1`` on CPU).

* ``dequant``: int4 (two a byte, even k in the high nibble, or the k32 order) or int8 codes ``(N, K)`` with
  their group scales (and packed zero points), addressed by strides so both metadata layouts work, to a dense
  16-bit matrix (the prefill path: dequantize, then cuBLAS).
* ``quant_rows``: per-token symmetric int8 / float8 activation quantization in one pass.

The decode GEMV is :mod:`.triton_gemv`, the fused prefill GEMM :mod:`.triton_gemm`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _deq(q, zoff, s, dt):
    """``(q - z) s`` rounded once to ``dt`` (``q`` an int32 code, ``zoff = 2^23 + z``): exact ``q - z`` via the
    2^23 mantissa trick, one product, one rounding -- the reference ``dequant_torch`` bit for bit."""
    return (((q | 0x4B000000).to(tl.float32, bitcast=True) - zoff) * s).to(dt)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_w16, stride_sn, stride_sg, stride_zn, stride_zg,
                   stride_on, FMT: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                   BLOCK_N: tl.constexpr, TB: tl.constexpr):
    """``FMT`` 4: int4 two a byte, 5: int4 k32 order, 8: int8. Each thread reads 16 bytes of codes of one row
    as four int32 words and writes their 32 (int4) or 16 (int8) values as one contiguous run: the values
    are put in k order in registers (``tl.join``/``tl.permute``), so stores are 16-byte vectors.
    ``GROUP == 0``: one scale per row. ``N % BLOCK_N == 0`` and ``K % (TB * codes per thread) == 0``."""
    CPT: tl.constexpr = 16 if FMT == 8 else 32
    dt = out_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
    tb = tl.program_id(1) * TB + tl.arange(0, TB)[None, :, None]
    e = tl.arange(0, 4)[None, None, :]
    wv = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rn * (stride_w16 * 4) + tb * 4 + e)   # (BN, TB, 4)
    # metadata tiles shaped like the words (same address along e): they get the words' register layout
    if GROUP > 0:
        g = tb * CPT // GROUP + e * 0
        s = tl.load(s_ptr + rn * stride_sn + g * stride_sg).to(tl.float32)
    else:
        g = tb * 0 + e * 0
        s = tl.load(s_ptr + rn * stride_sn + g).to(tl.float32)
    if FMT == 8:
        zoff = 8388608.0 + 128.0
    elif HAS_Z:
        zb = tl.load(z_ptr + (rn // 2) * stride_zn + g * stride_zg).to(tl.int32)
        zoff = 8388608.0 + tl.where(rn % 2 == 0, zb >> 4, zb & 15).to(tl.float32)
    else:
        zoff = 8388608.0 + 8.0
    if FMT == 8:  # word w byte j = code 4 w + j (its sign bit flipped: q + 128)
        b0 = _deq(((wv >> 0) & 255) ^ 128, zoff, s, dt)
        b1 = _deq(((wv >> 8) & 255) ^ 128, zoff, s, dt)
        b2 = _deq(((wv >> 16) & 255) ^ 128, zoff, s, dt)
        b3 = _deq(((wv >> 24) & 255) ^ 128, zoff, s, dt)
        v = tl.join(tl.join(b0, b2), tl.join(b1, b3))                           # (BN, TB, w, j1, j0)
    elif FMT == 4:  # word w byte j: code 8 w + 2 j (high nibble) and 8 w + 2 j + 1 (low)
        h0 = _deq((wv >> 4) & 15, zoff, s, dt)
        h1 = _deq((wv >> 12) & 15, zoff, s, dt)
        h2 = _deq((wv >> 20) & 15, zoff, s, dt)
        h3 = _deq((wv >> 28) & 15, zoff, s, dt)
        l0 = _deq(wv & 15, zoff, s, dt)
        l1 = _deq((wv >> 8) & 15, zoff, s, dt)
        l2 = _deq((wv >> 16) & 15, zoff, s, dt)
        l3 = _deq((wv >> 24) & 15, zoff, s, dt)
        hi = tl.join(tl.join(h0, h2), tl.join(h1, h3))
        lo = tl.join(tl.join(l0, l2), tl.join(l1, l3))
        v = tl.join(hi, lo)                                                      # (BN, TB, w, j1, j0, h)
    else:  # k32: word w nibble p = code 4 p + w
        n0 = _deq(wv & 15, zoff, s, dt)
        n1 = _deq((wv >> 4) & 15, zoff, s, dt)
        n2 = _deq((wv >> 8) & 15, zoff, s, dt)
        n3 = _deq((wv >> 12) & 15, zoff, s, dt)
        n4 = _deq((wv >> 16) & 15, zoff, s, dt)
        n5 = _deq((wv >> 20) & 15, zoff, s, dt)
        n6 = _deq((wv >> 24) & 15, zoff, s, dt)
        n7 = _deq((wv >> 28) & 15, zoff, s, dt)
        v = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
        v = tl.permute(v, (0, 1, 3, 4, 5, 2))                                   # (BN, TB, p2, p1, p0, w)
    v = tl.reshape(v, (BLOCK_N, TB * CPT))
    rn2 = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    rk2 = tl.program_id(1) * (TB * CPT) + tl.arange(0, TB * CPT)[None, :]
    tl.store(out_ptr + rn2 * stride_on + rk2, v)


@triton.jit
def quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, QMAX: tl.constexpr, FP8: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK)
    m = rk < K
    x = tl.load(x_ptr + row * stride_xm + rk, mask=m, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / QMAX, 1e-12)
    v = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
    if FP8:
        q = v.to(q_ptr.dtype.element_ty)
    else:
        q = tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int8)  # round half away from zero
    tl.store(q_ptr + row * stride_qm + rk, q, mask=m)
    tl.store(s_ptr + row, scale)
