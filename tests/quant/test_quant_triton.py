"""The Triton kernels, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``) in a subprocess.

Skipped where Triton is not installed; otherwise every kernel (the decode kernels of triton_decode, FMA and
tensor-core, with and without split-K, in both scale layouts, int4 k32 / int8 / e4m3, several weights in one
launch; the older int4 "pairs"
GEMV and fused GEMM; dequantize of every code order, alone and several layers into one matrix; the fused
prefill of layers sharing an input, eager and traced by dynamo; activation quantization) is checked
against the float reference on fresh random inputs (the seed is printed), outputs poisoned with NaN first
so an unwritten element fails. fp16 operands: the interpreter's bf16 dot is not exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch
    from openautoglm.quant import kernels
    from openautoglm.quant.kernels import ops
    from openautoglm.quant.config import QuantConfig
    from openautoglm.quant.linear import LINEAR_CLASSES
    from openautoglm.quant.math import quantize_per_token, to_fp8
    seed = torch.seed()
    print("seed", seed)
    N, K = 48, 256
    lin = torch.nn.Linear(K, N, bias=False).half().requires_grad_(False)

    def rel(y, ref):
        return float((y.float() - ref).norm() / ref.norm())

    def check(launch, M, ref_w, cfg, what):
        x = torch.randn(M, K, dtype=torch.float16)
        y = torch.full((M, N), float("nan"), dtype=x.dtype)
        launch(x, y, cfg)
        e = rel(y, x.float() @ ref_w.t())
        assert e < 2e-3, (what, M, cfg, e)

    old = lambda bk, bn, split, dot: dict(kernel="v1", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, DOT=dot, num_warps=4,
                                          num_stages=1)
    fma = lambda r, t, split, pf=0: dict(kernel="fma", R=r, T=t, SPLIT_K=split, num_warps=1, PF=pf)
    dot = lambda bn, split: dict(kernel="dot", BLOCK_N=bn, TW=16, SPLIT_K=split, num_warps=1, num_stages=1)
    asc = ops._ascending
    cases = [("w4", False, 128, True, "k32"), ("w4", True, 32, False, "k32"), ("w4", False, 128, True, "pairs"),
             ("w8", True, None, True, "k32"), ("w8", True, 64, False, "k32")]
    for scheme, sym, g, groups, pack in cases:
        cfgq = QuantConfig(scheme=scheme, symmetric=sym, group_size=g, layout="groups" if groups else "rows", pack=pack)
        mod = LINEAR_CLASSES[scheme].from_linear(lin, cfgq)
        w, s, z, gs = mod.qweight, mod.scale, mod.zero, mod.group
        fmt = (5 if mod.k32 else 4) if mod.bits == 4 else 8
        dense = kernels.dequant_torch(w, s, z, mod.bits, gs, torch.float32, groups, mod.k32)
        tag = (scheme, sym, g, groups, pack)
        gv = lambda x, y, c: ops.launch_gemv(x, w, s, z, fmt, gs, groups, y, c)
        if fmt != 5:  # the v1 kernels: int4 two codes a byte (older checkpoints), int8
            check(gv, 1, dense, old(256, 16, 3, False), tag)
            check(gv, 3, dense, old(min(64, gs), 16, 2, True), tag)
            gm = lambda x, y, c: ops.launch_gemm(x, w, s, z, mod.bits, gs, groups, y, c)
            gcfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=min(64, gs), GROUP_M=2, num_warps=4, num_stages=1)
            check(gm, 40, dense.half().float(), gcfg, tag + ("gemm",))
        if fmt != 4:
            check(gv, 1, dense, fma(2, 4, 2), tag)
            check(gv, 3, dense, fma(1, 2, 1), tag)
            check(gv, 1, dense, fma(2, 4, 3, pf=1), tag + ("prefetch",))  # splits of 1, 1 and 0 iterations
            check(gv, 4, dense, fma(1, 2, 1, pf=1), tag + ("prefetch",))
            ops._ascending = lambda: True  # the tile axis order of Triton < 3.7: same results
            check(gv, 2, dense, fma(2, 4, 2), tag + ("ascending",))
            ops._ascending = asc
            if ops.dot_ok(K, fmt, gs):
                check(gv, 5, dense, dot(16, 2), tag)
        out = ops.dequant(w, s, z, fmt, gs, groups, K, torch.float16)
        assert torch.equal(out, kernels.dequant_torch(w, s, z, mod.bits, gs, torch.float16, groups, mod.k32)), tag
    # several weights of one K in one launch (q/k/v, gate/up): the same numbers as one launch per weight
    for scheme, fmt in (("w4", 5), ("w8", 8)):
        mods = [LINEAR_CLASSES[scheme].from_linear(torch.nn.Linear(K, n, bias=False).half(), QuantConfig(scheme=scheme))
                for n in (48, 16, 32)]
        ws_, ss_, zs_ = [m.qweight for m in mods], [m.scale for m in mods], [m.zero for m in mods]
        x = torch.randn(1, K, dtype=torch.float16)
        for nw, pf in ((2, 0), (3, 0), (3, 1)):
            cfg = fma(1, 4, 2, pf)
            y = torch.full((1, sum(m.out_features for m in mods[:nw])), float("nan"), dtype=x.dtype)
            ops.launch_gemv_multi(x, ws_[:nw], ss_[:nw], zs_[:nw], fmt, mods[0].group, True, y, cfg)
            one = torch.cat([ops.launch_gemv(x, w_, s_, z_, fmt, mods[0].group, True,
                                             torch.empty(1, w_.shape[0], dtype=x.dtype), cfg)
                             for w_, s_, z_ in zip(ws_[:nw], ss_[:nw], zs_[:nw])], 1)
            assert torch.equal(y, one), (scheme, nw)
    # prefill of layers sharing an input (q/k/v, gate/up): dequantized into one matrix, one GEMM
    # (kernels.fused_linears, the CUDA-only gate opened here); traced by dynamo with dynamic shapes, no break
    kernels._fused_ok = lambda x: True
    for scheme, ns, bias in (("w4", (48, 16, 32), False), ("w8", (32, 64), True)):
        mods = [LINEAR_CLASSES[scheme].from_linear(torch.nn.Linear(K, n, bias=bias).half(), QuantConfig(scheme=scheme))
                for n in ns]
        cat = ops.dequant_cat([m.qweight for m in mods], [m.scale for m in mods], [m.zero for m in mods],
                              *mods[0].dequant_operands()[3:], K, torch.float16)
        assert torch.equal(cat, torch.cat([kernels.dequant_torch(m.qweight, m.scale, m.zero, m.bits, m.group,
                                                                 torch.float16, True, m.k32) for m in mods])), scheme
        x = torch.randn(2, 10, K, dtype=torch.float16)
        ref = [m(x) for m in mods]  # the torch path of each layer (CPU tensors)
        fused = torch.compile(kernels.fused_linears, fullgraph=True, dynamic=True, backend="eager")
        for out in (kernels.fused_linears(x, mods), fused(x, mods)):
            assert out is not None and len(out) == len(mods), scheme
            for o, r in zip(out, ref):
                assert o.shape == r.shape and float((o.float() - r.float()).abs().max()) < 2e-3, scheme
        assert kernels.fused_linears(x[:, :4], mods) is None  # 8 rows: each layer's own decode kernel
    wq, ws = to_fp8(lin.weight.float())
    f8 = lambda x, y, c: ops.launch_gemv(x, wq, ws, None, 9, K, False, y, c)
    check(f8, 1, wq.float() * ws, fma(2, 4, 2), "fp8")
    check(f8, 1, wq.float() * ws, fma(2, 4, 2, pf=1), "fp8 prefetch")
    check(f8, 4, wq.float() * ws, dot(16, 1), "fp8")
    x = torch.randn(3, K, dtype=torch.float16)
    q, sc = ops.quant_rows(x, False)
    qr, sr = quantize_per_token(x)
    assert int((q.int() - qr.int()).abs().max()) <= 1 and torch.allclose(sc, sr)
    print("OK")
""")


def test_triton_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    probe = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True)
    if probe.returncode:
        pytest.skip("triton is not installed")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if "only 0-dimensional arrays" in r.stderr:
        pytest.skip("this numpy is too new for triton's interpreter")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-500:] + r.stderr[-2000:]
