"""Triton kernels of the quantized Linear layers (CUDA; testable on CPU with ``TRITON_INTERPRET=1``).

* ``wo_matmul``: ``y (M, N) = x (M, K) @ dequant(W)^T`` for small M (decode). W is int8 ``(N, K)``,
  packed int4 ``(N, K/2)`` (even k in the high nibble) or float8 e4m3 ``(N, K)``; one scale (and
  optionally an int4 zero point, packed two rows a byte) per ``GROUP`` inputs of each output row. The codes go straight into the
  tensor-core dot as 16-bit floats (exact: |code| <= 127); scales and zero points are applied to the
  partial sums of each K tile (``x @ ((q - z) s) = (x @ q) s - sum(x) z s``), so dequantization costs almost
  nothing and only the packed bytes cross the memory bus. Split-K with fp32 atomics fills the GPU when
  N is small.
* ``dequant``: the same formats to a dense 16-bit matrix (prefill: dequantize then cuBLAS GEMM).
* ``wo_gemv`` (v2, the int4 decode default): the same product with the codes dequantized in fp32 registers:
  element-wise FMA accumulation at M=1 (one reduction at the end), ``tl.dot`` on the dequantized 16-bit tile
  for 2..16 rows; codes read as int32 words or bytes (autotuned).
* ``quant_rows``: per-token symmetric int8 / float8 activation quantization in one pass.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wo_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
                     GROUP: tl.constexpr, BITS: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_iter = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for it in range(0, n_iter):
        k0 = (pid_k * n_iter + it) * BLOCK_K
        if BITS == 4:
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            wb = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :], mask=mask_n[:, None])
            hi = (wb >> 4).to(dt)
            lo = (wb & 15).to(dt)
            ke = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + ke[None, :], mask=mask_m[:, None], other=0.0)
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + ke[None, :] + 1, mask=mask_m[:, None], other=0.0)
            part = tl.dot(xe, tl.trans(hi)) + tl.dot(xo, tl.trans(lo))
            xsum = tl.sum(xe.to(tl.float32), 1) + tl.sum(xo.to(tl.float32), 1)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=mask_n[:, None]).to(dt)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None], other=0.0)
            part = tl.dot(xt, tl.trans(w))
            xsum = tl.sum(xt.to(tl.float32), 1)
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * s[None, :]
        if HAS_Z:  # integer zero points, two rows a byte: x @ ((q - z) s) = (x @ q) s - sum(x) z s
            zb = tl.load(z_ptr + (rn // 2) * stride_zn + g, mask=mask_n, other=0)
            zc = tl.where(rn % 2 == 0, zb >> 4, zb & 15).to(tl.float32)
            acc -= xsum[:, None] * (zc * s)[None, :]
        elif BITS == 4:  # symmetric int4 codes are stored with an offset of 8
            acc -= 8.0 * xsum[:, None] * s[None, :]
    ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:  # the output in x's dtype, written once: no zero-fill or cast kernels around it
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # fp32 output buffer, zeroed by the caller
        tl.atomic_add(ptrs, acc, mask=mask)


def _prune(configs, named_args, **kwargs):
    K, group = named_args["K"], kwargs.get("GROUP", named_args.get("GROUP"))
    ok = [c for c in configs
          if c.kwargs["BLOCK_K"] <= group and K % (c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"]) == 0]
    return ok or [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}, num_warps=4)]


# SPLIT_K=1 only: at decode the output is tiny and a split would need a zero-fill and a cast kernel
# around every matmul (two extra launches per Linear inside the decode graph). Parallelism comes from
# narrow BLOCK_N instead (N / 16 programs).
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [
        (16, 128, 2, 4), (16, 256, 4, 3), (16, 64, 2, 5), (32, 128, 4, 4), (32, 256, 4, 3), (32, 64, 2, 5),
        (64, 128, 4, 4), (64, 64, 4, 4), (16, 32, 2, 6),
    ]
]

wo_matmul_tuned = triton.autotune(
    configs=_CONFIGS, key=["M", "N", "K", "BITS", "GROUP"],
    prune_configs_by={"early_config_prune": _prune},
)(wo_matmul_kernel)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn, stride_on,
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
        s = tl.load(s_ptr + rn[:, None] * stride_sn + ke[None, :] // GROUP, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            zb = tl.load(z_ptr + (rn[:, None] // 2) * stride_zn + ke[None, :] // GROUP, mask=m, other=0)
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
        s = tl.load(s_ptr + rn[:, None] * stride_sn + rk[None, :] // GROUP, mask=m, other=0.0).to(tl.float32)
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


# ----------------------------------------------------------------------------- decode GEMV (v2)

@triton.jit
def wo_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
                   GROUP: tl.constexpr, BITS: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr = True):
    """``y (M, N) = x (M, K) @ dequant(W)^T``, memory-bound decode form.

    int4 codes are read as int32 words ``(N, K/8)`` (eight codes a word, byte j holding k = 8i+2j in its
    high nibble and 8i+2j+1 in its low one), so each row's codes stream in wide, coalesced loads; they are
    unpacked with shifts in registers and dequantized in fp32 with one scale (and zero) per group. With
    ``BLOCK_M == 1`` the products accumulate element-wise in registers and are reduced once at the end (no
    tensor cores, no per-tile reduction); otherwise the dequantized 16-bit tile goes into ``tl.dot``.
    A tile spans ``NG`` groups of ``GS`` inputs (``BLOCK_K`` a multiple or a divisor of ``GROUP``).
    """
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1
    GS: tl.constexpr = BLOCK_K // NG
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    rn_safe = tl.where(mask_n, rn, 0)
    dt = x_ptr.dtype.element_ty
    rg = tl.arange(0, NG)
    if BLOCK_M == 1:
        acc3 = tl.zeros((BLOCK_N, NG, GS), dtype=tl.float32)
    else:
        rm = tl.arange(0, BLOCK_M)
        mask_m = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BITS == 4:
        j = tl.arange(0, 8)
        shifts = 4 * j + 4 - 8 * (j % 2)
    for k0 in range(0, K, BLOCK_K):
        if BITS == 4 and WIDE:
            rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            wv = tl.load(w_ptr + rn_safe[:, None] * stride_wn + rw[None, :])
            q = ((wv[:, :, None] >> shifts[None, None, :]) & 15).to(tl.float32)
        elif BITS == 4:  # byte loads, nibbles interleaved in registers
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            wb = tl.load(w_ptr.to(tl.pointer_type(tl.uint8)) + rn_safe[:, None] * (stride_wn * 4) + rb[None, :])
            q = tl.reshape(tl.join((wb >> 4).to(tl.float32), (wb & 15).to(tl.float32)), (BLOCK_N, BLOCK_K))
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_ptr + rn_safe[:, None] * stride_wn + rk[None, :]).to(tl.float32)
        q3 = tl.reshape(q, (BLOCK_N, NG, GS))
        g = (k0 + rg * GS) // GROUP
        s = tl.load(s_ptr + rn_safe[:, None] * stride_sn + g[None, :]).to(tl.float32)
        if HAS_Z:
            zb = tl.load(z_ptr + (rn_safe[:, None] // 2) * stride_zn + g[None, :])
            zc = tl.where(rn_safe[:, None] % 2 == 0, zb >> 4, zb & 15).to(tl.float32)
            w3 = (q3 - zc[:, :, None]) * s[:, :, None]
        elif BITS == 4:
            w3 = (q3 - 8.0) * s[:, :, None]
        else:
            w3 = q3 * s[:, :, None]
        if BLOCK_M == 1:
            xk = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
            acc3 += w3 * tl.reshape(xk, (NG, GS))[None, :, :]
        else:
            rk2 = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk2[None, :], mask=mask_m[:, None], other=0.0)
            acc += tl.dot(xt, tl.trans(tl.reshape(w3, (BLOCK_N, BLOCK_K)).to(dt)))
    if BLOCK_M == 1:
        yv = tl.sum(tl.reshape(acc3, (BLOCK_N, BLOCK_K)), 1)
        tl.store(y_ptr + rn, yv.to(y_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def _prune_gemv(configs, named_args, **kwargs):
    K = named_args["K"]
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
    ok = []
    for c in configs:
        bk, bn = c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"]
        wide = c.kwargs["WIDE"]
        bits = kwargs.get("BITS", named_args.get("BITS"))
        fits = (bk % group == 0) if bk >= group else (group % bk == 0)
        if fits and K % bk == 0 and (bm == 1) == (c.kwargs["PATH"] == "fma") and (wide or bits == 4):
            ok.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "WIDE": wide}, num_warps=c.num_warps,
                                    num_stages=c.num_stages))
    return ok or [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)]


# (path, BLOCK_N, BLOCK_K, warps, stages, wide): "fma" for one row, "dot" for 2..16 rows; wide=False reads
# the int4 codes byte-wise (only tried for int4). On the H100 (7B shapes, bf16) the autotuner picked the byte
# loads: fma 8x256 w4 s3 at M=1 and dot 16x128 w4 s3 at M=8/16 (benchmarks/results/quant_kernels_gpu.json).
# The last three fma rows were added after that run (narrower tiles around the winner; not measured yet).
_GEMV_CONFIGS = [
    triton.Config({"PATH": p, "BLOCK_N": bn, "BLOCK_K": bk, "WIDE": wide}, num_warps=w, num_stages=st)
    for p, bn, bk, w, st, wide in [
        ("fma", 8, 256, 4, 3, True), ("fma", 16, 256, 4, 3, True), ("fma", 16, 128, 4, 4, True),
        ("fma", 16, 512, 8, 2, True), ("fma", 16, 128, 4, 4, False), ("fma", 8, 256, 4, 3, False),
        ("fma", 4, 256, 2, 3, False), ("fma", 8, 128, 4, 4, False), ("fma", 8, 512, 4, 3, False),
        ("dot", 16, 128, 4, 3, True), ("dot", 32, 128, 4, 3, True), ("dot", 16, 256, 4, 3, True),
        ("dot", 16, 128, 4, 3, False),
    ]
]

wo_gemv_tuned = triton.autotune(
    configs=_GEMV_CONFIGS, key=["N", "K", "BITS", "GROUP", "BLOCK_M"],
    prune_configs_by={"early_config_prune": _prune_gemv},
)(wo_gemv_kernel)
