"""GPU correctness and per-kernel timing of this round's decode pieces (issue 11), before the model rows.

1. Decode attention over the static cache (``kv.dense_decode.decode_triton``) against the masked SDPA it
   replaces: 7B (MHA, D=128) and 1B-shaped (GQA 8, D=64) heads, batch 1 and 8, several ``pos``; max error and
   cosine; time of both inside a CUDA graph at half-full caches.
2. The multi-weight decode GEMV (q/k/v, gate/up in one launch) against one launch per weight, int4 / int8 /
   e4m3 codes: max relative difference and time.
3. Programmatic dependent launch (``ops.PDL``) on and off: identical outputs, and the time of a chain of
   (RMSNorm-like pointwise kernel, GEMV) pairs captured in one CUDA graph, as a decode step has them.

Writes ``$OUT/quant_gpu_checks.json``; prints one line per check.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from openautoglm.kv.kernels import dense_decode  # noqa: E402
from openautoglm.quant import QuantConfig, quantize
from openautoglm.quant.kernels import ops  # noqa: E402
from quant_tune import time_us  # noqa: E402

RES: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "date": time.strftime("%Y-%m-%d %H:%M"), "git_commit": os.environ.get("GIT_COMMIT", "?")}


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
            if hasattr(ops, "PDL"):
                prev = ops.PDL
                try:
                    ops.PDL = False
                    c = multi().float()
                    res["pdl_off_identical"] = bool(torch.equal(a, c))
                finally:
                    ops.PDL = prev
            out.append(res)
            print("gemv", {k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in res.items()}, flush=True)
    RES["gemv_multi"] = out


def pdl_chain():
    """32 x (pointwise RMSNorm-like kernel, w4 GEMV 4096 -> 4096) in one graph, PDL on vs off."""
    out = {}
    if not hasattr(ops, "PDL"):
        RES["pdl_chain"] = "ops.PDL does not exist in this tree"
        return
    mod = _qlinear(4096, 4096, "w4")
    w, s, z, fmt, group, gm = mod.decode_operands()
    x0 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(4096, device="cuda", dtype=torch.bfloat16)

    def chain():
        h = x0
        for _ in range(32):
            h = (h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * g
            h = ops.wq_gemv(h, w, s, z, fmt, group, gm)
        return h

    prev = ops.PDL
    try:
        for flag in (True, False):
            ops.PDL = flag
            out[f"pdl_{flag}"] = {"us_per_pair": time_us([chain], CUDA, 20) / 32, "out": chain().float()}
    finally:
        ops.PDL = prev
    same = bool(torch.equal(out["pdl_True"]["out"], out["pdl_False"]["out"]))
    RES["pdl_chain"] = {"us_per_pair_pdl_on": out["pdl_True"]["us_per_pair"],
                        "us_per_pair_pdl_off": out["pdl_False"]["us_per_pair"], "identical_outputs": same}
    print("pdl chain", RES["pdl_chain"], flush=True)


def main():
    dest = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    dest.mkdir(parents=True, exist_ok=True)
    for fn in (attention_checks, gemv_checks, pdl_chain):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record, go on to the next check
            import traceback

            RES.setdefault("errors", []).append(f"{fn.__name__}: {e!r}"[:400])
            print(traceback.format_exc()[-1500:], flush=True)
        (dest / "quant_gpu_checks.json").write_text(json.dumps(RES, indent=1))


if __name__ == "__main__":
    main()
