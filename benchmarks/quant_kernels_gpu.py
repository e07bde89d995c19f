"""Per-layer microbenchmark of the weight-only decode/prefill kernels (GPU; ``--smoke`` checks it on CPU).

For each Llama-7B-shaped Linear (K -> N) and each number of rows M, times one matmul inside a CUDA graph
(median over replays) with the weights rotated over enough copies that they do not stay in the 50 MB L2:
bf16 ``F.linear``, w4/w8 decode kernels v1 (``wo_matmul``: codes in the tensor-core dot) and v2
(``wo_gemv``), tinygemm (``torch._weight_int4pack_mm``) and, at prefill M, dequantize + bf16 GEMM.
Every kernel is first checked against a float reference (relative error, fresh random inputs).

    python benchmarks/quant_kernels_gpu.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from openautoglm.quant import kernels
from openautoglm.quant.config import QuantConfig
from openautoglm.quant.linear import LINEAR_CLASSES


DEQUANT_TILES = [(32, 256, 4), (64, 256, 8), (32, 1024, 8)]


class _Fixed:
    """Stand-in for an autotuned kernel with one fixed config (the interpreter cannot autotune)."""

    def __init__(self, kernel, **cfg):
        self.kernel, self.cfg = kernel, cfg

    def __getitem__(self, grid):
        def launch(*args, **kw):
            g = grid({**kw, **self.cfg}) if callable(grid) else grid
            return self.kernel[g](*args, **kw, **self.cfg)
        return launch


def time_fn(fns, dev, reps=7):
    """Median microseconds of one call; ``fns`` is a list of closures over the weight copies."""
    if dev.type != "cuda":
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) / len(fns) * 1e6
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    calls = max(len(fns), 32 // len(fns) * len(fns))
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


@torch.no_grad()
def bench_shape(K, N, ms, dev, dtype, prefill_m, with_v1=True):
    torch.manual_seed(K + N)
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
    bf16_bytes = K * N * 2
    ncopy = max(2, min(16, -(-240_000_000 // (K * N // 2))))  # >= 240 MB of int4 codes in flight
    if dev.type != "cuda":
        ncopy = 2
    mods = {
        "w4": LINEAR_CLASSES["w4"].from_linear(lin, QuantConfig(scheme="w4")),
        "w8": LINEAR_CLASSES["w8"].from_linear(lin, QuantConfig(scheme="w8")),
    }
    tg = None
    if dev.type == "cuda":
        tg = LINEAR_CLASSES["w4"].from_linear(lin, QuantConfig(scheme="w4", kernel="tinygemm"))
    dense = {b: kernels.dequant_torch(m.qweight, m.scale, m.zero, m.bits, m.group, torch.float32)
             for b, m in mods.items()}
    copies = {b: [(m.qweight.clone(), m.scale.clone(), None if m.zero is None else m.zero.clone())
                  for _ in range(ncopy)] for b, m in mods.items()}
    wcopies = [lin.weight.detach().clone() for _ in range(min(ncopy, max(2, -(-240_000_000 // bf16_bytes))))]
    rows = []
    for M in ms:
        x = torch.randn(M, K, device=dev, dtype=dtype)
        ref_f = x.float() @ lin.weight.float().t()
        r = {"K": K, "N": N, "M": M, "weight_copies": ncopy}
        variants = {"bf16": [lambda w=w: F.linear(x, w) for w in wcopies]}
        if M <= kernels.DECODE_MAX_M:
            for bits, name in ((4, "w4"), (8, "w8")):
                g = mods[name].group
                if with_v1:
                    variants[f"{name}_v1"] = [lambda c=c, b=bits, g=g: kernels.wo_matmul(x, c[0], c[1], c[2], b, g)
                                             for c in copies[name]]
                variants[f"{name}_v2"] = [lambda c=c, b=bits, g=g: kernels.wo_gemv(x, c[0], c[1], c[2], b, g)
                                         for c in copies[name]]
            if tg is not None:
                tgc = [(tg._tg_w.clone(), tg._tg_sz.clone()) for _ in range(ncopy)]
                variants["tinygemm"] = [lambda c=c: torch._weight_int4pack_mm(x, c[0], 128, c[1]) for c in tgc]
        else:
            for name in ("w4", "w8"):
                m = mods[name]
                variants[f"{name}_dequant_gemm"] = [
                    lambda c=c, m=m: F.linear(x, kernels.dequant_triton(c[0], c[1], c[2], m.bits, m.group, K, dtype)
                                              if kernels.TRITON_OK or dev.type != "cuda" else
                                              kernels.dequant_torch(c[0], c[1], c[2], m.bits, m.group, dtype))
                    for c in copies[name][:2]]
        if M > kernels.DECODE_MAX_M:  # dequantize alone, a few tile shapes of the dequant kernel
            from openautoglm.quant import triton_kernels as tk

            for name in ("w4", "w8"):
                m = mods[name]
                for bn, bk, nw in DEQUANT_TILES:
                    def run(c, m=m, bn=bn, bk=bk, nw=nw):
                        out = torch.empty((N, K), device=dev, dtype=dtype)
                        z = c[2]
                        tk.dequant_kernel[(kernels.triton_cdiv(N, bn), kernels.triton_cdiv(K, bk))](
                            c[0], c[1], z if z is not None else c[1], out, N, K, c[0].stride(0), c[1].stride(0),
                            z.stride(0) if z is not None else 0, out.stride(0), GROUP=m.group, BITS=m.bits,
                            HAS_Z=z is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
                        return out
                    try:
                        out = run(copies[name][0])
                        r[f"{name}_dequant_{bn}x{bk}w{nw}_maxerr"] = float((out.float() - dense[name]).abs().max())
                        r[f"{name}_dequant_{bn}x{bk}w{nw}_us_only"] = time_fn(
                            [lambda c=c: run(c) for c in copies[name][:4]], dev)
                    except Exception as e:  # noqa: BLE001
                        r[f"{name}_dequant_{bn}x{bk}w{nw}_error"] = repr(e)[:300]
        for name, fns in variants.items():
            try:
                y = fns[0]()
                qref = x.float() @ dense[name[:2]].t() if name[:2] in dense else ref_f
                if name == "tinygemm":
                    qref = x.float() @ dense["w4"].t()
                r[f"{name}_relerr"] = rel(y, qref)
                r[f"{name}_us"] = time_fn(fns, dev)
            except Exception as e:  # noqa: BLE001 - report and go on with the other kernels
                r[f"{name}_error"] = repr(e)[:300]
        base = r.get("bf16_us")
        for key in list(r):
            if key.endswith("_us") and base and key != "bf16_us":
                r[key.replace("_us", "_x_bf16")] = base / r[key]
        r["bf16_GBps"] = bf16_bytes / r["bf16_us"] / 1e3 if base else None
        rows.append(r)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, fixed configs")
    args = ap.parse_args()
    if args.smoke:
        from openautoglm.quant import triton_kernels as tk

        tk.wo_gemv_tuned = _Fixed(tk.wo_gemv_kernel, BLOCK_N=16, BLOCK_K=64)
        tk.wo_matmul_tuned = _Fixed(tk.wo_matmul_kernel, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)
        dev, dtype, shapes, ms, pm = torch.device("cpu"), torch.float16, [(256, 128)], [1, 8], [32]
        kernels.DECODE_MAX_M = 16
    else:
        dev, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [(4096, 11008), (11008, 4096)]
        ms, pm = [1, 8, 16], [2048]
    rows = []
    for K, N in shapes:
        rows += bench_shape(K, N, ms + pm, dev, dtype, pm, with_v1=not rows)
        write(args, dev, rows)
    print_table(rows)
    bad = [(r["K"], r["N"], r["M"], k, v) for r in rows for k, v in r.items() if k.endswith("_relerr") and v > 2e-2]
    if bad:
        print("RELERR TOO LARGE:", bad)
        sys.exit(1)


def autotuned():
    """The configs the autotuners picked, per key."""
    try:
        from openautoglm.quant import triton_kernels as tk

        return {name: {str(k): str(v) for k, v in getattr(getattr(tk, name), "cache", {}).items()}
                for name in ("wo_gemv_tuned", "wo_matmul_tuned")}
    except Exception as e:  # noqa: BLE001
        return repr(e)


def write(args, dev, rows):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = None
    import transformers
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "triton": __import__("triton").__version__, "git_commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "timing": "CUDA graph, median of 7 replays, weights rotated over copies (> L2)",
           "autotuned": autotuned(), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    name = "quant_kernels_gpu_smoke.json" if args.smoke else "quant_kernels_gpu.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(res, f, indent=1)


def print_table(rows):
    cols = ["bf16", "w4_v1", "w4_v2", "tinygemm", "w8_v1", "w8_v2", "w4_dequant_gemm", "w8_dequant_gemm"]
    print(f"{'K':>6} {'N':>6} {'M':>5} " + " ".join(f"{c:>16}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            us = r.get(f"{c}_us")
            cells.append(f"{us:8.1f}us {r.get(f'{c}_x_bf16', 1.0):4.2f}x" if us else f"{'-':>16}")
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>5} " + " ".join(cells))
        deq = {k: round(v, 1) for k, v in r.items() if k.endswith("_us_only")}
        if deq:
            print("       dequant only (us):", deq)


if __name__ == "__main__":
    main()
