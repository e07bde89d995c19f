"""Triton kernel of decode attention over a full-precision static KV cache (flash-decoding in one launch).

One query token per sequence, keys ``0 .. pos`` of a cache of ``L`` rows (``pos`` read from device memory:
the step runs inside a CUDA graph, where no host copy of it exists). Program ``(split s, sequence x KV
head)`` takes the keys ``[s * CHUNK, (s + 1) * CHUNK)`` that are ``<= pos``, in tiles of ``BLOCK_N``:

* the ``GRP`` query heads of its KV head, padded to ``BLOCK_H`` (>= 16) rows, are the rows of the score dot
  ``q (BLOCK_H, D) @ k^T (D, BLOCK_N)`` and of ``p (BLOCK_H, BLOCK_N) @ v (BLOCK_N, D)`` (tensor cores,
  float32 accumulation); the softmax is online (running max and sum) in base 2, ``log2(e)`` folded into
  the scale;
* it writes its unnormalised float32 output, max and sum to the workspace, then takes a ticket
  (``atomic_add``, acq_rel); the last program of its (sequence, KV head) combines the non-empty splits
  ``0 .. ceil((pos + 1) / CHUNK) - 1`` in that fixed order (deterministic), writes ``o`` in the query's
  dtype and re-arms the ticket to zero. Programs whose chunk starts after ``pos`` only take their ticket.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """``tl.dot``; ``UPCAST`` (only under Triton's CPU interpreter, whose bf16 dot reads the bits wrongly): the
    bf16 operands as float32, which holds them exactly (the tensor cores' float32 accumulation)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def dense_decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, po_ptr, pm_ptr, pl_ptr, o_ptr, ticket_ptr, qk_scale, L,
                        CHUNK, n_split, sq_b, sq_h, sk_b, sk_h, sk_n, so_b, so_h,
                        HKV: tl.constexpr, GRP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                        UPCAST: tl.constexpr):
    """q (B, HKV * GRP, 1, D) strides ``sq_*``; k / v (B, HKV, L, D) strides ``sk_*`` (last one 1); o (B, H, 1, D)
    strides ``so_*``; workspace: ``po`` (B * HKV, n_split, BLOCK_H, D), ``pm`` / ``pl`` (B * HKV, n_split,
    BLOCK_H) float32; ``ticket`` (>= B * HKV,) int32, zero on entry and on exit; ``BLOCK_S``: a power of two
    >= ``n_split`` (the combine is unrolled over it, the unused splits masked off)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)  # 64-bit offsets: a large batch's cache passes 2**31 elements
    hk = bh % HKV
    n_valid = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, L)
    start = split * CHUNK
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    hmask = offs_h < GRP
    heads = hk * GRP + offs_h
    wrow = (bh * n_split + split) * BLOCK_H + offs_h  # this program's workspace rows
    if start < n_valid:
        stop = tl.minimum(start + CHUNK, n_valid)
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
        kb = k_ptr + b * sk_b + hk * sk_h
        vb = v_ptr + b * sk_b + hk * sk_h
        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, D), tl.float32)
        for n0 in range(start, stop, BLOCK_N):  # every tile holds at least one valid key: m_i stays finite
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < stop
            k = tl.load(kb + offs_n[:, None] * sk_n + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = _dot(q, tl.trans(k), UPCAST) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vb + offs_n[:, None] * sk_n + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
            m_i = m_new
        tl.store(po_ptr + wrow[:, None] * D + offs_d[None, :], acc, mask=hmask[:, None])
        tl.store(pm_ptr + wrow, m_i, mask=hmask)
        tl.store(pl_ptr + wrow, l_i, mask=hmask)
    ticket = tl.atomic_add(ticket_ptr + bh, 1, sem="acq_rel")
    if ticket == n_split - 1:  # last one in: combine the non-empty splits in split order, re-arm the ticket
        n_used = tl.cdiv(n_valid, CHUNK)
        m_t = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_t = tl.zeros((BLOCK_H,), tl.float32)
        o_t = tl.zeros((BLOCK_H, D), tl.float32)
        for s in tl.static_range(BLOCK_S):  # unrolled: the loads do not wait for the previous split's sums
            ok = hmask & ((offs_h * 0 + s) < n_used)
            row = (bh * n_split + s) * BLOCK_H + offs_h
            m_s = tl.load(pm_ptr + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
            m_s = tl.where(hmask, m_s, 0.0)  # padding rows stay finite; unused splits weigh exp2(-inf) = 0
            l_s = tl.load(pl_ptr + row, mask=ok, other=0.0, cache_modifier=".cg")
            o_s = tl.load(po_ptr + row[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0,
                          cache_modifier=".cg")
            m_n = tl.maximum(m_t, m_s)  # finite from split 0 on (it always holds key 0)
            c_t = tl.exp2(m_t - m_n)
            c_s = tl.exp2(m_s - m_n)
            l_t = l_t * c_t + l_s * c_s
            o_t = o_t * c_t[:, None] + o_s * c_s[:, None]
            m_t = m_n
        out = o_t / tl.where(l_t > 0, l_t, 1.0)[:, None]
        tl.store(o_ptr + b * so_b + heads[:, None] * so_h + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=hmask[:, None])
        tl.atomic_xchg(ticket_ptr + bh, 0)
