"""GPU correctness and per-kernel timing of the decode pieces, before the model rows of :mod:`benchmarks.quant.speed`.

1. Decode attention over the static cache (``kv.dense_decode.decode_triton``) against the masked SDPA it
   replaces: 7B (MHA, D=128) and 1B-shaped (GQA 8, D=64) heads, batch 1 and 8, several ``pos``; max error and
   cosine; time of both inside a CUDA graph at half-full caches.
2. The multi-weight decode GEMV (q/k/v, gate/up in one launch) against one launch per weight, int4 / int8 /
   e4m3 codes: max relative difference and time.

Times are CUDA-graph medians (:func:`benchmarks._harness.time_us`). Writes ``gpu_checks.json`` to ``--out``
(default ``$OUT/quant``, else ``benchmarks/results/quant``); prints one line per check.

    python -m benchmarks.quant.gpu_checks [--out DIR]
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._harness import environment, out_dir, time_us, write_json
from openautoglm.kv.kernels import dense_decode
from openautoglm.quant import QuantConfig, quantize
from openautoglm.quant.kernels import ops

RES: dict = {}
CUDA = torch.device("cuda")


def attention_checks():
    out = []
    for B, H, Hkv, D, L in ((1, 32, 32, 128, 512), (8, 32, 32, 128, 512), (1, 32, 32, 128, 4096),
                            (1, 32, 4, 64, 512), (8, 32, 4, 64, 4096), (2, 28, 4, 128, 2048)):
        q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        scale = D ** -0.5
        worst, cos_min = 0.0, 1.0
        for p in (0, 63, 64, 200, L // 2, L - 1):
            pos = torch.tensor([p], device="cuda")
            a = dense_decode.decode_triton(q, k, v, pos, scale).float()
            r = dense_decode.decode_reference(q, k, v, pos, scale).float()
            worst = max(worst, (a - r).abs().max().item())
            cos_min = min(cos_min, F.cosine_similarity(a.flatten(), r.flatten(), 0).item())
        pos = torch.tensor([L // 2], device="cuda")
        t_k = time_us([lambda: dense_decode.decode_triton(q, k, v, pos, scale)], CUDA, 50)
        t_r = time_us([lambda: dense_decode.decode_reference(q, k, v, pos, scale)], CUDA, 50)
        row = dict(B=B, H=H, Hkv=Hkv, D=D, L=L, max_abs_err=worst, cos_min=cos_min, kernel_us=t_k, sdpa_us=t_r,
                   x_sdpa=t_r / t_k)
        out.append(row)
        print("attention", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    RES["attention"] = out


def _qlinear(n, k, scheme):
    m = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to("cuda" if torch.cuda.is_available() else "cpu",
                                                                   torch.bfloat16)
    quantize(m, QuantConfig(scheme=scheme))
    return m[0]


def gemv_checks():
    out = []
    shapes = {"7b qkv": ((4096, 4096, 4096), 4096), "7b gate/up": ((11008, 11008), 4096),
              "1b qkv": ((2048, 256, 256), 2048), "1b gate/up": ((5632, 5632), 2048)}
    for scheme in ("w4", "w8", "w8a8-fp8"):
        for name, (ns, k) in shapes.items():
            mods = [_qlinear(n, k, scheme) for n in ns]
            opers = [m.decode_operands() for m in mods]
            if any(o is None for o in opers):
                out.append({"scheme": scheme, "shape": name, "skipped": "no decode operands"})
                continue
            fmt, group, gm = opers[0][3:]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ws, ss, zs = [o[0] for o in opers], [o[1] for o in opers], [o[2] for o in opers]
            multi = lambda: ops.wq_gemv_multi(x, ws, ss, zs, fmt, group, gm)  # noqa: E731
            sep = lambda: torch.cat([ops.wq_gemv(x, w, s, z, fmt, group, gm) for w, s, z in zip(ws, ss, zs)], 1)  # noqa: E731
            a, b = multi().float(), sep().float()
            rel = ((a - b).norm() / b.norm()).item()
            res = {"scheme": scheme, "shape": name, "rel_diff_multi_vs_separate": rel,
                   "multi_us": time_us([multi], CUDA, 50), "separate_us": time_us([sep], CUDA, 50)}
            out.append(res)
            print("gemv", {k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in res.items()}, flush=True)
    RES["gemv_multi"] = out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder (default: $OUT/quant, else benchmarks/results/quant)")
    args = ap.parse_args()
    path = Path(args.out or out_dir("quant")) / "gpu_checks.json"
    RES.update(environment(CUDA))
    for fn in (attention_checks, gemv_checks):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record, go on to the next check
            RES.setdefault("errors", []).append(f"{fn.__name__}: {e!r}"[:400])
            print(traceback.format_exc()[-1500:], flush=True)
        write_json(path, RES)
    print("wrote", path)


if __name__ == "__main__":
    main()
