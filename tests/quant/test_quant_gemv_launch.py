"""Launches of the decode GEMVs: several weights in one launch of the v1 kernel (:mod:`openautoglm.quant.kernels.triton_gemv`,
``NW`` = 2 / 3).

The kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, in a subprocess) against float references
of each weight on fresh random inputs (the seed is printed; outputs poisoned with NaN first so an unwritten
element fails): int8 (w8) and e4m3 codes, and the older int4 "pairs" codes with zero points (per-weight zero
pointers and strides), one activation row (FMA path) and four (tensor-core path), with and without split-K,
group-wise scales in the group-major layout (a different group stride per weight) and one scale per row,
3 weights of 96, 32 and 32 rows (not multiples of the 64-row block). The same kernel is compiled for sm_90 on
the CPU (Triton's own ptxas) in the configurations of the H100 table: no register spills, and the weights are
still read in 16-byte vectors when the weight is chosen per program.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import sm90_tool

H100_V1 = [(8, False, 16, 256, 2), (9, False, 16, 256, 2), (8, True, 64, 64, 3), (9, True, 128, 64, 3)]  # fmt, DOT,
# BLOCK_N, BLOCK_K, num_stages of the v1 rows of gemv_tuned.json (4 warps)


def compile_sm90(fn, const: dict, ptrs: dict, num_warps: int = 4, num_stages: int = 2, **options):
    """``fn`` compiled for sm_90 on the CPU as a launch specializes it: pointers, K, N and the row strides
    16-divisible; ``ptrs``: Triton types of the pointer arguments (``x``/``y`` fp16 by default)."""
    import triton
    from triton.backends.compiler import GPUTarget

    names = fn.arg_names
    types = {"x_ptr": "*fp16", "y_ptr": "*fp16", "part_ptr": "*fp32", "ticket_ptr": "*i32", **ptrs}
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    div16 = ("N", "K", "N0", "N1", "stride_xm", "stride_wn", "stride_wv", "stride_ym")
    div = [n for n in names if n not in const and (n.endswith("_ptr") or n in div16)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    opts = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True, **options)  # fusion: the default
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def loop_spills(sass: str) -> list[str]:
    """Local-memory (spill) instructions inside any loop of the SASS (between a backward branch and its
    target)."""
    import re

    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(t.group(1), 16), a) for a, op in ins if (t := re.search(r"BRA\s+`?\(?0x([0-9a-f]+)", op))
             and int(t.group(1), 16) < a]
    return [op for a, op in ins if re.search(r"\b(LDL|STL)\b", op) and any(lo <= a <= hi for lo, hi in loops)]


def v1_sm90(fmt: int, dot: bool, bn: int, bk: int, stages: int, nw: int, split: bool, **extra):
    from openautoglm.quant.kernels.triton_gemv import gemv_kernel

    code, scale = {8: ("*i8", "*fp16"), 9: ("*fp8e4nv", "*fp32")}[fmt]
    ptrs = {f"{a}{i}_ptr": t for i in ("", "1", "2") for a, t in (("w", code), ("s", scale), ("z", scale))}
    const = dict(FMT=fmt, GROUP=0, HAS_Z=False, BLOCK_M=16 if dot else 1, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split,
                 DOT=dot, NW=nw, **extra)
    return compile_sm90(gemv_kernel, const, ptrs, 4, stages)

SCRIPT = textwrap.dedent("""
    import torch
    from openautoglm.quant import kernels
    from openautoglm.quant.kernels import ops, triton_gemv
    from openautoglm.quant.config import QuantConfig
    from openautoglm.quant.linear import LINEAR_CLASSES
    seed = torch.seed()
    print("seed", seed)
    K, NS = 256, (96, 32, 32)

    class Count:  # records launches of the v1 kernel: grids and the split-K partials buffer
        def __init__(self, kernel):
            self.kernel, self.grids, self.parts = kernel, [], []

        def __getitem__(self, grid):
            self.grids.append(grid)

            def launch(*args, **kw):
                self.parts.append(args[5])
                return self.kernel[grid](*args, **kw)
            return launch

    counter = Count(triton_gemv.gemv_kernel)
    triton_gemv.gemv_kernel = counter

    def fp8_weights(n, group):
        # e4m3 codes with one float32 scale per row (group None) or per group of the group-major (G, N) layout
        w = torch.randn(n, K)
        g = group or K
        amax = w.reshape(n, K // g, g).abs().amax(-1)
        s = (amax / 448.0).clamp_min(1e-8)
        q = (w.reshape(n, K // g, g) / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(n, K)
        dense = (q.float().reshape(n, K // g, g) * s[..., None]).reshape(n, K)
        return (q, s.t().contiguous() if group else s, None, dense), group is not None

    def int_weights(scheme, group, pack="pairs", sym=True):
        cfg = QuantConfig(scheme=scheme, group_size=group, symmetric=sym, layout="groups", pack=pack)
        out = []
        for n in NS:
            m = LINEAR_CLASSES[scheme].from_linear(torch.nn.Linear(K, n, bias=False).half(), cfg)
            dense = kernels.dequant_torch(m.qweight, m.scale, m.zero, m.bits, m.group, torch.float32, True, m.k32)
            out.append((m.qweight, m.scale, m.zero, dense))
        return out, m.group

    cases = []
    for group in (64, None):
        f8 = [fp8_weights(n, group) for n in NS]
        cases.append(("e4m3", 9, [c for c, _ in f8], group or K))
        ws, g = int_weights("w8", group)
        cases.append(("int8", 8, ws, g))
    ws, g = int_weights("w4", 64, sym=False)
    cases.append(("int4 pairs asym", 4, ws, g))

    v1 = lambda split, dot, bk: dict(kernel="v1", BLOCK_N=64, BLOCK_K=bk, SPLIT_K=split, DOT=dot, num_warps=4,
                                     num_stages=1)
    for name, fmt, ws, group in cases:
        for nw in (3, 2):
            sel = ws[:nw]
            ref_w = torch.cat([d for *_, d in sel])
            n_blocks = sum(-(-n // 64) for n in NS[:nw])
            for M, split in ((1, 1), (1, 3), (4, 1), (4, 2)):
                if nw == 2 and M == 4 and split == 1:
                    continue
                cfg = v1(split, M > 1, 128 if M == 1 else min(64, group))  # M = 1: 2 groups a tile, 2 tiles
                x = torch.randn(M, K, dtype=torch.float16)
                y = torch.full((M, ref_w.shape[0]), float("nan"), dtype=x.dtype)
                counter.grids.clear()
                ops.launch_gemv_multi(x, [w for w, *_ in sel], [s for _, s, *_ in sel], [z for _, _, z, _ in sel],
                                      fmt, group, True, y, cfg)
                assert counter.grids == [(n_blocks, split)], (name, counter.grids)
                ref = x.float() @ ref_w.t()
                rel = float((y.float() - ref).norm() / ref.norm())
                cos = float(torch.nn.functional.cosine_similarity(y.float().flatten(), ref.flatten(), 0))
                for i, n in enumerate(NS[:nw]):  # every weight's columns on their own
                    o = sum(NS[:i])
                    part = float((y[:, o:o + n].float() - ref[:, o:o + n]).norm() / ref[:, o:o + n].norm())
                    assert part < 2e-3, (name, nw, M, split, i, part)
                assert rel < 2e-3 and cos > 0.99999, (name, nw, M, split, rel, cos)
                if split > 1:  # each split's float32 partials, in their own columns (interleaved programs
                    bk = cfg["BLOCK_K"]  # would collide otherwise; the interpreter runs them one by one)
                    per = -(-(K // bk) // split)
                    for sk in range(split):
                        k0, k1 = min(sk * per * bk, K), min((sk + 1) * per * bk, K)
                        pref = x[:, k0:k1].float() @ ref_w[:, k0:k1].t()
                        err = float((counter.parts[-1][sk] - pref).abs().max()) / float(ref.abs().max())
                        assert err < 1e-3, (name, nw, M, split, sk, err)
    # what one launch cannot take falls back to one launch per weight, with the same result
    ws, g = int_weights("w8", 64)
    x = torch.randn(1, K, dtype=torch.float16)
    ref = x.float() @ torch.cat([d for *_, d in ws]).t()
    mixed = [ws[0][1], ws[1][1].float(), ws[2][1]]  # one weight's scales in float32
    y = torch.full((1, sum(NS)), float("nan"), dtype=x.dtype)
    counter.grids.clear()
    ops.launch_gemv_multi(x, [w for w, *_ in ws], mixed, [None] * 3, 8, g, True, y, v1(1, False, 64))
    assert len(counter.grids) == 3 and float((y.float() - ref).norm() / ref.norm()) < 2e-3, counter.grids
    # the custom op (configuration of the stacked shape: the v1 kernel for int8 at one row) launches once
    counter.grids.clear()
    y = ops.wq_gemv_multi(x, [w for w, *_ in ws], [s for _, s, *_ in ws], [None] * 3, 8, g, True)
    assert len(counter.grids) == 1 and float((y.float() - ref).norm() / ref.norm()) < 2e-3, counter.grids
    print("OK")
""")


def test_v1_gemv_multi_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    probe = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True)
    if probe.returncode:
        pytest.skip("triton is not installed")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if "only 0-dimensional arrays" in r.stderr:
        pytest.skip("this numpy is too new for triton's interpreter")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-500:] + r.stderr[-3000:]


def test_v1_gemv_multi_compiles_for_sm90():
    """Per-weight pointers chosen per program keep the 16-byte weight vectors (the selects keep the pointers'
    16-divisibility) and spill nothing, in every v1 configuration of the H100 table."""
    kr = sm90_tool()
    import re

    def vectors(k):  # 16-byte global loads (LDG.E.128) and global->shared copies (LDGSTS...128) in the SASS
        return len(re.findall(r"LDG(?:STS)?\.E[.A-Z]*\.128", kr.cuobjdump(k.asm["cubin"], "-sass")))

    for fmt, dot, bn, bk, stages in H100_V1:
        one = vectors(v1_sm90(fmt, dot, bn, bk, stages, 1, False))
        assert one > 0, (fmt, dot)
        for nw, split in ((3, False), (2, True)):
            k = v1_sm90(fmt, dot, bn, bk, stages, nw, split)
            regs, stack = kr.registers(k.asm["cubin"])
            assert stack == 0 and regs <= 128, (fmt, dot, nw, regs, stack)
            assert vectors(k) == one, (fmt, dot, nw, vectors(k), one)


def test_decode_kernels_compile_for_sm90_without_loop_spills():
    """The FMA and tensor-core decode kernels (and the FMA kernel's MoE mode) compile for sm_90 in tuned 7B-class
    configurations and spill nothing inside a loop."""
    kr = sm90_tool()

    from openautoglm.quant.kernels import ops
    from openautoglm.quant.kernels.triton_decode import decode_dot_kernel, decode_kernel

    def dec():  # w4 k32, group 128 with zero points, one row, split-K, prefetch: a tuned 7B configuration (R 4, T 8)
        ptrs = {f"{a}{i}_ptr": t for i in ("", "1", "2") for a, t in (("w", "*u8"), ("s", "*fp16"), ("z", "*u8"))}
        const = dict(FMT=4, GROUP=128, HAS_Z=True, BLOCK_M=1, R=4, RB=16, T=8, SPLIT=True,
                     ASCENDING=ops._ascending(), NW=1, PF=1, EXPERTS=False)
        return compile_sm90(decode_kernel, const, ptrs, 4, 1)

    def experts():  # the grouped GEMV of MoE decode (quant/kernels/ops_moe.py): expert ids read on the device
        ptrs = {f"{a}{i}_ptr": t for i in ("", "1", "2") for a, t in (("w", "*u8"), ("s", "*fp16"), ("z", "*u8"))}
        const = dict(FMT=4, GROUP=128, HAS_Z=True, BLOCK_M=1, R=4, RB=16, T=8, SPLIT=False,
                     ASCENDING=ops._ascending(), NW=1, PF=0, EXPERTS=True)
        return compile_sm90(decode_kernel, const, {**ptrs, "idx_ptr": "*i32"}, 4, 1)

    def dot():  # int8 per row, 2..16 rows
        ptrs = {"w_ptr": "*i8", "s_ptr": "*fp16", "z_ptr": "*fp16"}
        const = dict(FMT=8, GROUP=0, HAS_Z=False, BLOCK_N=128, TW=16, SPLIT=True)
        return compile_sm90(decode_dot_kernel, const, ptrs, 4, 2)

    for name, build in {"fma": dec, "dot": dot, "experts": experts}.items():
        k = build()
        assert not loop_spills(kr.cuobjdump(k.asm["cubin"], "-sass")), (name, kr.registers(k.asm["cubin"]))

