"""Per-layer sweep of the weight-only kernels on the GPU (``--smoke``: CPU + Triton interpreter, tiny shapes).

For 7B and 1B Llama layer shapes and M = 1, 8, 16 rows: bf16 ``F.linear`` (cuBLAS) and our decode GEMV
(``ops.launch_gemv``) for w4 (g128, asymmetric), w8 (per channel) and the e4m3 weights of w8a8-fp8, each
over a set of launch configurations and split-K counts; at M = 2048 the fused dequant-GEMM over its
configurations, dequantize + cuBLAS, and the fp8 ``_scaled_mm`` path. Every configuration is checked
against the float reference before it is timed. Timing: CUDA graph of many calls over weight copies
that do not fit in L2, median of replays; GB/s = weight bytes (codes + scales + zeros) / time, against
a device-to-device copy measured in the same run. Writes ``quant_kernels_gpu.json`` (best configurations
per shape in a form ``ops.GEMV_TUNED`` takes).

    python -m benchmarks.quant.kernels_gpu [--out DIR] [--smoke] [--budget-s 240]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--smoke" in sys.argv:  # before torch and triton are imported: interpret the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._harness import T0, copy_gbps, environment, log, out_dir, time_us, write_json  # noqa: E402
from openautoglm.quant import kernels  # noqa: E402
from openautoglm.quant.config import QuantConfig  # noqa: E402
from openautoglm.quant.kernels import ops  # noqa: E402
from openautoglm.quant.linear import LINEAR_CLASSES  # noqa: E402
from openautoglm.quant.math import to_fp8  # noqa: E402

SHAPES = {"7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
          "1b": [(2048, 2048), (2048, 256), (2048, 5632), (5632, 2048)]}
# (BLOCK_N, BLOCK_K, warps, stages); run 1 on the H100 (fp8, FMA): 16 x 256, 4 warps, 2 stages won.
FMA = {4: [(16, 256, 4, 2), (32, 256, 4, 2), (16, 512, 4, 2), (32, 512, 8, 2), (8, 512, 4, 2)],
       8: [(16, 256, 4, 2), (16, 128, 4, 2), (32, 256, 8, 2), (8, 256, 4, 2)]}
DOT = [(64, 128, 4, 2), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages); run 1: the best of six tiles was 256 x 128 x 64, 8 warps.
GEMM = [(256, 128, 64, 8, 8, 3)]
SPLITS = [1, 2, 3, 4, 6, 8, 12, 16]


def formats(lin, K):
    """fmt -> (w, s, z, group, groups_major, float32 dense reference, bytes)."""
    out = {}
    for fmt, scheme in ((4, "w4"), (8, "w8")):
        m = LINEAR_CLASSES[scheme].from_linear(lin, QuantConfig(scheme=scheme))
        dense = kernels.dequant_torch(m.qweight, m.scale, m.zero, m.bits, m.group, torch.float32, m.groups_major)
        nbytes = sum(t.numel() * t.element_size() for t in (m.qweight, m.scale, m.zero) if t is not None)
        out[fmt] = (m.qweight, m.scale, m.zero, m.group, m.groups_major, dense, nbytes)
    wq, ws = to_fp8(lin.weight.float())
    out[9] = (wq, ws, None, K, False, wq.float() * ws, wq.numel() + ws.numel() * 4)
    return out


def sweep_shape(K, N, ms, dev, dtype, args, res):
    torch.manual_seed(K * 7 + N)
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    fm = formats(lin, K)
    ncopy = 2 if dev.type != "cuda" else max(2, min(12, -(-200_000_000 // fm[4][6])))
    copies = {f: [tuple(t.clone() if t is not None else None for t in v[:3]) for _ in range(ncopy)] for f, v in fm.items()}
    wcopies = [lin.weight.clone() for _ in range(max(2, min(ncopy, -(-200_000_000 // (K * N * 2)))))]
    for M in ms:
        x = torch.randn(M, K, device=dev, dtype=dtype)
        row = {"K": K, "N": N, "M": M, "bf16_us": time_us([lambda w=w: F.linear(x, w) for w in wcopies], dev)}
        row["bf16_GBps"] = K * N * 2 / row["bf16_us"] / 1e3
        for fmt, (w, s, z, group, gm, dense, nbytes) in fm.items():
            ref = x.float() @ dense.t()
            cands = FMA[4 if fmt == 4 else 8] if M == 1 else DOT
            best = None
            for bn, bk, nw, st in cands[: args.max_cfgs]:
                if K % bk or (M > 1 and fmt != 9 and group < K and bk > group):
                    continue
                n_blocks = -(-N // bn)
                for split in SPLITS:
                    if split > K // bk or not (dev.type != "cuda" or 0.4 <= n_blocks * split / args.sms <= 8) \
                            or (dev.type != "cuda" and split > 2):
                        continue
                    cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=st, DOT=M > 1, SPLIT_K=split)
                    y = torch.full((M, N), float("nan"), device=dev, dtype=dtype)
                    try:
                        ops.launch_gemv(x, w, s, z, fmt, group, gm, y, cfg)
                        err = float((y.float() - ref).norm() / ref.norm())
                        if not err < 2e-2:
                            row.setdefault("bad", []).append([fmt, cfg, err])
                            continue
                        us = time_us([lambda c=c, cfg=cfg: ops.launch_gemv(x, c[0], c[1], c[2], fmt, group, gm,
                                                                            torch.empty_like(y), cfg)
                                      for c in copies[fmt]], dev)
                    except Exception as e:  # noqa: BLE001 - a config that fails to build is reported, not fatal
                        row.setdefault("errors", []).append([fmt, cfg, repr(e)[:200]])
                        break
                    if best is None or us < best[0]:
                        best = (us, cfg, err)
            if best:
                row[f"f{fmt}_us"], row[f"f{fmt}_cfg"], row[f"f{fmt}_relerr"] = best
                row[f"f{fmt}_GBps"] = nbytes / best[0] / 1e3
                row[f"f{fmt}_x_bf16"] = row["bf16_us"] / best[0]
                res["tuned"][f"{fmt},{1 if M == 1 else 16},{N},{K}"] = best[1]
        res["rows"].append(row)
        log({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("cfg")})
        if time.time() - T0 > args.budget_s:
            return
    if args.prefill and dev.type == "cuda" or args.smoke:
        prefill(K, N, lin, fm, copies, dev, dtype, args, res)


def prefill(K, N, lin, fm, copies, dev, dtype, args, res):
    M = args.prefill
    x = torch.randn(M, K, device=dev, dtype=dtype)
    row = {"K": K, "N": N, "M": M, "bf16_us": time_us([lambda: F.linear(x, lin.weight)] * 2, dev)}
    for fmt in (4, 8):
        w, s, z, group, gm, dense, _ = fm[fmt]
        ref = x.float() @ dense.to(dtype).float().t()
        best = None
        for bm, bn, bk, gmm, nw, st in GEMM[: args.max_cfgs]:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, group), GROUP_M=gmm, num_warps=nw, num_stages=st)
            try:
                y = torch.empty(M, N, device=dev, dtype=dtype)
                ops.launch_gemm(x, w, s, z, fmt, group, gm, y, cfg)
                err = float((y.float() - ref).norm() / ref.norm())
                if not err < 2e-2:
                    row.setdefault("bad", []).append([fmt, cfg, err])
                    continue
                us = time_us([lambda c=c, cfg=cfg: ops.launch_gemm(x, c[0], c[1], c[2], fmt, group, gm,
                                                                  torch.empty_like(y), cfg) for c in copies[fmt][:2]], dev)
            except Exception as e:  # noqa: BLE001
                row.setdefault("errors", []).append([fmt, cfg, repr(e)[:200]])
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        if best:
            row[f"f{fmt}_fused_us"], row[f"f{fmt}_fused_cfg"] = best
            row[f"f{fmt}_fused_x_bf16"] = row["bf16_us"] / best[0]
            res["tuned_gemm"][f"{fmt},{N},{K}"] = best[1]
        row[f"f{fmt}_dequant_only_us"] = time_us([lambda c=c: ops.dequant(c[0], c[1], c[2], fmt, group, gm, K, dtype)
                                                  for c in copies[fmt][:2]], dev)
        row[f"f{fmt}_dequant_gemm_us"] = time_us(
            [lambda c=c: F.linear(x, ops.dequant(c[0], c[1], c[2], fmt, group, gm, K, dtype)) for c in copies[fmt][:2]], dev)
    if dev.type == "cuda" and kernels.FP8_OK:
        wq, ws = fm[9][0], fm[9][1]
        row["fp8_us"] = time_us([lambda: kernels.fp8_linear(x, wq, ws)] * 2, dev)
        row["fp8_x_bf16"] = row["bf16_us"] / row["fp8_us"]
        xq, xs = ops.quant_rows(x, True)
        row["fp8_gemm_only_us"] = time_us([lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.reshape(1, -1),
                                                                    out_dtype=dtype)] * 2, dev)
    res["prefill"].append(row)
    log({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("cfg")})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder (default: $OUT/quant, else benchmarks/results/quant)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--models", default="7b,1b")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--max-cfgs", type=int, default=99)
    args = ap.parse_args()
    if args.smoke:
        dev, dtype, shapes, ms = torch.device("cpu"), torch.float16, [(256, 64)], [1, 4]
        args.prefill, args.max_cfgs, args.sms = 32, 2, 4
    else:
        dev, dtype, ms = torch.device("cuda"), torch.bfloat16, [1, 8, 16]
        shapes = [s for m in args.models.split(",") for s in SHAPES[m]]
        args.sms = ops.sm_count(dev)
    args.out = Path(args.out or out_dir("quant", args.smoke))
    res = {**environment(dev), "smoke": args.smoke,
           "timing": "CUDA graph over weight copies > L2, median of 5 replays", "copy_GBps": copy_gbps(dev),
           "rows": [], "prefill": [], "tuned": {}, "tuned_gemm": {}}
    log("copy GB/s", res["copy_GBps"])
    for K, N in shapes:
        if time.time() - T0 > args.budget_s:
            log("budget: skipping", K, N)
            continue
        sweep_shape(K, N, ms, dev, dtype, args, res)
        write(res, args)
    write(res, args)
    for r in res["rows"]:
        print(f"{r['K']:>6} {r['N']:>6} M={r['M']:>2} bf16 {r['bf16_us']:7.1f}us " + " ".join(
            f"f{f} {r.get(f'f{f}_us', 0):6.1f}us {r.get(f'f{f}_GBps', 0):5.0f}GB/s" for f in (4, 8, 9)))
    for r in res["prefill"]:
        print(r["K"], r["N"], {k: round(v, 1) for k, v in r.items() if k.endswith("_us")})


def write(res, args):
    write_json(args.out / ("kernels_gpu_smoke.json" if args.smoke else "kernels_gpu.json"), res)


if __name__ == "__main__":
    main()
