"""The KV Triton kernels, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``) in a subprocess.

On fresh random inputs: the device append (one token into the window ring, quantizing the oldest block
when the window is full) must leave the same store as the float reference; the split-KV decode attention
(quantized blocks across programs, the full-precision window in the same launch, the reduce) must match
the float reference on the dequantized store, for INT8/INT4/INT2, GQA and MHA, a padding mask, a sliding
window (a ring of block slots) and the growing (exact-size) store. Skipped where Triton is not installed.
"""

from __future__ import annotations

import textwrap

from conftest import run_interpreted, sm90_tool

SCRIPT = textwrap.dedent("""
    import torch
    from openautoglm.kv.kernels import ops
    from openautoglm.kv.static_store import StaticQuantStore
    from openautoglm.kv.stores import QuantStore
    torch.manual_seed(0)
    # bits, group, residual, capacity, window, kv heads, q per kv head, head_dim, batch, prefill, decode, mask
    for bits, g, r, cap, win, hkv, grp, d, b, pre, dec, use_mask in [
            (4, 16, 16, 96, 0, 2, 4, 32, 2, 40, 2, True),
            (2, 16, 16, 160, 48, 1, 1, 64, 1, 100, 1, False),
            (8, 16, 0, 64, 0, 1, 2, 32, 1, 33, 1, False)]:
        k = torch.randn(b, hkv, pre + dec, d); v = torch.randn(b, hkv, pre + dec, d)
        k[..., 1] *= 10
        st, ref, dyn = StaticQuantStore(bits, g, r, cap, win), StaticQuantStore(bits, g, r, cap, win), QuantStore(bits, g, r, win)
        for s in (st, ref, dyn):
            s.append(k[:, :, :pre], v[:, :, :pre])
        for t in range(pre, pre + dec):
            kt, vt = k[:, :, t:t + 1], v[:, :, t:t + 1]
            ops.append_triton(st.view(), kt, vt)
            ops.append_reference(ref.view(), kt, vt)
            for s in (st, ref):
                s.length_t.add_(1); s._host_len += 1
            dyn.append(kt, vt)
        for a in ("kq", "vq"):
            assert int((getattr(st, a).int() - getattr(ref, a).int()).abs().max()) <= 1, a
        for a in ("ks", "km", "vs", "vm", "rk", "rv"):
            assert torch.equal(getattr(st, a), getattr(ref, a)), a
        L = pre + dec
        q = torch.randn(b, hkv * grp, 1, d)
        mask = None
        if use_mask:
            mask = torch.rand(b, L + 5) > 0.3
            mask[:, L - 1] = True
        assert ops.kernel_supports(st.view(), d)
        for s in (st, dyn):
            want = ops.decode_reference(s.view(), q, mask, d ** -0.5)
            # the default launch (group 1: the tl.dot-free kernel), the tl.dot kernel, bytes shared by the
            # channel parts with more, shorter splits
            for cfg in (None, dict(vec=False), dict(share_bytes=True, per_sm=64, min_blocks=1, num_warps=8)):
                got = ops.decode_triton(s.view(), q, mask, d ** -0.5, cfg)
                rel = float((got - want).norm() / want.norm())
                assert got.shape == (b, 1, hkv * grp, d) and rel < 1e-5, (bits, type(s).__name__, cfg, rel)
        # the quantized attention stays close to exact attention over the unquantized K/V
        lo = max(0, L - win) if win else 0
        kk, vv = k[:, :, lo:L].repeat_interleave(grp, 1), v[:, :, lo:L].repeat_interleave(grp, 1)
        m = None if mask is None else mask[:, None, None, lo:L]
        exact = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=d ** -0.5)
        cos = float(torch.nn.functional.cosine_similarity(got.flatten(), exact.transpose(1, 2).flatten(), 0))
        assert cos > {8: 0.999, 4: 0.98, 2: 0.75}[bits], (bits, cos)
    # half-precision queries: codes OR-ed into fp16 1024.0 (no int->float conversion), the offset taken off
    # through the bias; must match the converting kernel and the reference (bf16 0x4300 is the same code with
    # another constant; the interpreter's bf16 is not usable, the GPU benchmark checks it)
    for bits, d, hkv, grp in ((4, 64, 2, 2), (2, 64, 1, 4), (8, 64, 2, 1)):
        k, v = torch.randn(2, hkv, 200, d), torch.randn(2, hkv, 200, d)
        st = StaticQuantStore(bits, 16, 16, 256)
        st.append(k.half(), v.half())
        q = torch.randn(2, hkv * grp, 1, d).half()
        want = ops.decode_reference(st.view(), q, None, d ** -0.5).float()
        assert ops.magic_bits(q.dtype, bits) == 0x6400 and ops.magic_bits(torch.bfloat16, 8) == 0
        for cfg in (dict(magic=False), dict(magic=True, share_bytes=True), dict(magic=True, share_bytes=False)):
            got = ops.decode_triton(st.view(), q, None, d ** -0.5, cfg).float()
            rel = float((got - want).norm() / want.norm())
            assert rel < 2e-3, (bits, cfg, rel)
    print("OK")
""")

# GQA group 1 takes the tl.dot-free kernel (triton_vec): against the float reference for INT2/4/8, tiles of a
# whole block or part of one, a padding mask, a sliding window (empty leading splits), a store shorter than
# its window (only the full-precision program has work), many short splits and one long one; groups 4 and
# 8 in the same store layouts keep the tl.dot kernel (vec on or off must not change them); eager and lazy
# rescaling of the accumulators.
VEC_SCRIPT = textwrap.dedent("""
    import torch
    from openautoglm.kv.kernels import ops
    from openautoglm.kv.static_store import StaticQuantStore
    from openautoglm.kv.stores import QuantStore
    torch.manual_seed(1)
    for bits, g, r, cap, win, hkv, grp, d, b, L, use_mask, bn in [
            (4, 16, 16, 160, 0, 2, 1, 64, 2, 150, True, 16),
            (8, 32, 16, 256, 0, 1, 1, 64, 1, 200, False, 16),
            (2, 16, 16, 200, 48, 1, 1, 64, 1, 190, True, 16),
            (4, 32, 0, 128, 0, 2, 1, 32, 1, 100, False, 32),
            (4, 16, 16, 64, 0, 1, 1, 32, 1, 5, False, 16),
            (8, 16, 16, 96, 0, 1, 4, 32, 1, 70, True, 16),
            (4, 16, 16, 96, 0, 1, 8, 32, 1, 90, False, 16)]:
        k = torch.randn(b, hkv, L, d); v = torch.randn(b, hkv, L, d); k[..., 1] *= 10
        for st in (StaticQuantStore(bits, g, r, cap, win), QuantStore(bits, g, r, win)):
            st.append(k, v)
            q = torch.randn(b, hkv * grp, 1, d)
            mask = None
            if use_mask:
                mask = torch.rand(b, L + 3) > 0.3; mask[:, L - 1] = True
            assert ops.kernel_supports(st.view(), d)
            want = ops.decode_reference(st.view(), q, mask, d ** -0.5)
            # lazy rescaling at 8 (rarely rescaled) and at 0.25 (rescaled on most tiles); codes read as int32
            # words, 4 or 2 words a thread
            for cfg in (None, dict(vec_block_n=bn, vec_per_sm=64, reduce_block_d=16),
                        dict(vec_block_n=g, vec_per_sm=1, vec_lazy=0.0, vec_words=0),
                        dict(vec_lazy=8.0, vec_words=4, vec_block_n=bn, vec_per_sm=64),
                        dict(vec_lazy=0.25, vec_words=2, vec_block_n=g, vec_per_sm=1)):
                got = ops.decode_triton(st.view(), q, mask, d ** -0.5, cfg)
                rel = float((got - want).norm() / want.norm())
                assert got.shape == (b, 1, hkv * grp, d) and rel < 1e-5, (bits, grp, type(st).__name__, cfg, rel)
    print("OK")
""")


def test_kv_vec_kernel_in_interpreter():
    run_interpreted(VEC_SCRIPT)


def test_kv_kernels_in_interpreter():
    run_interpreted(SCRIPT)


def test_kv_vec_kernel_compiles_for_sm90():
    """The default vec launch compiles for the H100 (sm_90) on this CPU through Triton's own ptxas, holds few
    enough registers for 3 programs of 4 warps per multiprocessor (<= 168 a thread; the first version held
    209 and ran 2), spills nothing, and takes fewer SASS instructions per 64-token tile than byte reads with
    eager rescaling (the interpreter cannot show either)."""
    kr = sm90_tool()
    from openautoglm.kv.kernels import ops

    cfg = ops.DECODE_CONFIG
    for bits in (4, 8):
        new = kr.compile_vec(bits, int(cfg["vec_block_n"]), cfg["vec_lazy"], cfg["vec_words"], cfg["vec_num_warps"])
        regs, stack = kr.registers(new)
        assert regs <= 168 and stack == 0, (bits, regs, stack)
        old = kr.loop_profile(kr.compile_vec(bits, 64, 0.0, 0))["per_tile"]
        assert kr.loop_profile(new)["per_tile"] < 0.85 * old, (bits, old)
