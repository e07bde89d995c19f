"""Triton kernels of the quantized Linear layers besides the GEMV/GEMM (CUDA; ``TRITON_INTERPRET=1`` on CPU).

* ``dequant``: int4 (two a byte, even k in the high nibble) or int8 codes ``(N, K)`` with their group scales
  (and packed zero points), addressed by strides so both metadata layouts work, to a dense 16-bit matrix.
* ``quant_rows``: per-token symmetric int8 / float8 activation quantization in one pass.

The decode GEMV is :mod:`.triton_gemv`, the fused prefill GEMM :mod:`.triton_gemm`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_on,
                   GROUP: tl.constexpr, BITS: tl.constexpr, HAS_Z: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    dt = out_ptr.dtype.element_ty
    if BITS == 4:
        rb = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        m = mask_n[:, None] & (rb[None, :] < K // 2)
        wb = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :], mask=m)
        ke = 2 * rb
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (ke[None, :] // GROUP) * stride_sg, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            zb = tl.load(z_ptr + (rn[:, None] // 2) * stride_zn + (ke[None, :] // GROUP) * stride_zg, mask=m, other=0)
            z = -tl.where(rn[:, None] % 2 == 0, zb >> 4, zb & 15).to(tl.float32) * s
        else:
            z = -8.0 * s
        hi = ((wb >> 4).to(tl.float32) * s + z).to(dt)
        lo = ((wb & 15).to(tl.float32) * s + z).to(dt)
        # interleave in registers so the store is one contiguous row segment (no stride-2 writes)
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mo = mask_n[:, None] & (rk[None, :] < K)
        tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], w, mask=mo)
    else:
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        m = mask_n[:, None] & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=m).to(tl.float32)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (rk[None, :] // GROUP) * stride_sg, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], (w * s).to(dt), mask=m)


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
