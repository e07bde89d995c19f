"""The Triton kernels, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``) in a subprocess.

Skipped where Triton is not installed (the CPU CI image); on a developer machine with Triton this checks
the kernels' arithmetic (fp16 operands: the interpreter's bf16 dot is not exact) against the torch ops.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch
    from openautoglm.quant import triton_kernels as tk, kernels
    from openautoglm.quant.config import QuantConfig
    from openautoglm.quant.linear import LINEAR_CLASSES
    from openautoglm.quant.math import quantize_per_token
    torch.manual_seed(0)
    M, N, K = 3, 64, 256
    x = torch.randn(M, K, dtype=torch.float16)
    lin = torch.nn.Linear(K, N, bias=False).half()
    for scheme, sym, g in [("w4", False, 128), ("w4", True, 64), ("w8", True, None), ("w8", True, 32)]:
        mod = LINEAR_CLASSES[scheme].from_linear(lin, QuantConfig(scheme=scheme, symmetric=sym, group_size=g))
        w, s, z = mod.qweight, mod.scale, mod.zero
        dense = kernels.dequant_torch(w, s, z, mod.bits, mod.group, torch.float32)
        ref = x.float() @ dense.t()
        y = torch.empty(M, N, dtype=x.dtype)
        zs = z.stride(0) if z is not None else 0
        tk.wo_matmul_kernel[(N // 32, 1)](x, w, s, z if z is not None else s, y, M, N, K, x.stride(0), w.stride(0),
            s.stride(0), zs, y.stride(0), GROUP=mod.group, BITS=mod.bits, HAS_Z=z is not None, BLOCK_M=16,
            BLOCK_N=32, BLOCK_K=min(64, mod.group), SPLIT_K=1)
        assert float((y.float() - ref).norm() / ref.norm()) < 2e-3, scheme
        wq = kernels.gemv_weight(w, mod.bits)
        for rows, bm, bk, wide in [(1, 1, 128, True), (1, 1, 32, False), (M, 16, 256, True), (M, 16, 64, False)]:
            xr = x[:rows]
            yv = torch.empty(rows, N, dtype=x.dtype)
            tk.wo_gemv_kernel[(N // 16,)](xr, wq, s, z if z is not None else s, yv, rows, N, K, xr.stride(0),
                wq.stride(0), s.stride(0), zs, yv.stride(0), GROUP=mod.group, BITS=mod.bits, HAS_Z=z is not None,
                BLOCK_M=bm, BLOCK_N=16, BLOCK_K=bk, WIDE=wide)
            assert float((yv.float() - ref[:rows]).norm() / ref[:rows].norm()) < 2e-3, (scheme, rows, bk, wide)
        out = torch.empty(N, K, dtype=torch.float16)
        tk.dequant_kernel[(N // 32, K // 128)](w, s, z if z is not None else s, out, N, K, w.stride(0), s.stride(0),
            zs, out.stride(0), GROUP=mod.group, BITS=mod.bits, HAS_Z=z is not None, BLOCK_N=32, BLOCK_K=128)
        assert float((out.float() - dense).abs().max()) < 2e-2 * float(dense.abs().max()), scheme
    q = torch.empty(M, K, dtype=torch.int8); sc = torch.empty(M, 1)
    tk.quant_rows_kernel[(M,)](x, q, sc, K, x.stride(0), q.stride(0), QMAX=127.0, FP8=False, BLOCK=256)
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
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
