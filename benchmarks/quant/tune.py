"""Per-layer decode kernels on the GPU: tune our launch configurations and time them against cuBLAS and tinygemm.

For each Llama layer shape ``(N, K)`` and M = 1 and 8 activation rows: bf16 ``F.linear`` (cuBLAS); tinygemm
(``torch._weight_int4pack_mm``, the kernel of torchao's int4 weight-only) on the same int4 codes; and our
decode kernels (:mod:`openautoglm.quant.kernels.triton_decode`) for w4 (k32 order, g128, asymmetric), w8 (per
channel) and the e4m3 weights of w8a8-fp8, over a few launch configurations each (FMA and tensor-core
kernels, rows per thread, split-K). Every configuration is first checked against the float reference on
fresh random inputs (output poisoned with NaN) and then timed: a CUDA graph of calls rotating over weight
copies that together exceed L2, median of replays. The fastest configuration per (format, rows, shape) is
installed into ``ops.GEMV_TUNED`` for the rest of the process and returned in the form ``gemv_tuned.json``
takes. At M = 2048 (prefill) on the given shapes: bf16, dequantize alone, dequantize + cuBLAS, fp8.

    python -m benchmarks.quant.tune --smoke      # CPU, Triton interpreter, tiny shapes (prints the tuned table)

:mod:`benchmarks.quant.tune_gpu` runs the tuning alone on a GPU and writes the JSON; :mod:`benchmarks.quant.speed`
runs it as its first section.
"""

from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__" and "--smoke" in sys.argv:  # before torch and triton are imported: interpret the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._harness import copy_gbps, time_us  # noqa: E402
from openautoglm.quant import kernels  # noqa: E402
from openautoglm.quant.config import QuantConfig  # noqa: E402
from openautoglm.quant.kernels import ops  # noqa: E402
from openautoglm.quant.linear import LINEAR_CLASSES  # noqa: E402
from openautoglm.quant.math import pack_int4, to_fp8, unpack_int4_k32  # noqa: E402

# M = 1: FMA kernel (rows per thread R, splits ~ waves x SMs); tensor-core kernel for comparison.
# PF: software prefetch of the next iteration's codes and scales; num_stages > 1: Triton's own loop pipelining.
FMA1 = ([dict(kernel="fma", R=r, T=8, num_warps=4, waves=w, PF=pf) for pf in (1, 0) for r in (2, 4) for w in (2, 4, 8)]
        + [dict(kernel="fma", R=4, T=8, num_warps=4, waves=4, PF=0, num_stages=3),
           dict(kernel="fma", R=4, T=8, num_warps=8, waves=4, PF=1), dict(kernel="fma", R=8, T=8, num_warps=4, waves=4, PF=1),
           dict(kernel="fma", R=4, T=16, num_warps=4, waves=4, PF=1)])
DOT = [dict(kernel="dot", BLOCK_N=bn, TW=16, num_warps=4, num_stages=2, waves=w) for bn in (64, 128) for w in (2, 4)]
# M = 1, int8 / e4m3 only: the row-major GEMV of triton_gemv (16-byte loads of 2-D tiles), their kernel so far
V1 = [dict(kernel="v1", BLOCK_N=bn, BLOCK_K=256, num_warps=nw, num_stages=2, DOT=False, waves=w)
      for bn, nw in ((16, 4), (32, 8), (32, 4)) for w in (2, 4)]


def formats(lin: torch.nn.Linear, K: int) -> dict:
    """fmt -> (w, s, z, group, groups_major, float32 dense reference, bytes read)."""
    out = {}
    for fmt, scheme in ((ops.FMT_INT4_K32, "w4"), (ops.FMT_INT8, "w8")):
        m = LINEAR_CLASSES[scheme].from_linear(lin, QuantConfig(scheme=scheme))
        dense = kernels.dequant_torch(m.qweight, m.scale, m.zero, m.bits, m.group, torch.float32, m.groups_major,
                                      m.k32)
        nbytes = sum(t.numel() * t.element_size() for t in (m.qweight, m.scale, m.zero) if t is not None)
        out[fmt] = (m.qweight, m.scale, m.zero, m.group, m.groups_major, dense, nbytes)
    wq, ws = to_fp8(lin.weight.float())
    out[ops.FMT_E4M3] = (wq, ws, None, K, False, wq.float() * ws, wq.numel() + ws.numel() * 4)
    return out


def _concrete(cand: dict, M: int, N: int, K: int, fmt: int, group: int, dev) -> dict | None:
    """The candidate with the split-K that ``ops.gemv_config`` derives from its ``waves`` (None: not valid here)."""
    if cand["kernel"] == "dot" and not ops.dot_ok(K, fmt, group, cand["TW"]):
        return None
    key = (fmt, 1 if M == 1 else 16, N, K)
    saved = ops.GEMV_TUNED.get(key)
    try:
        ops.GEMV_TUNED[key] = dict(cand)
        return ops.gemv_config(M, N, K, fmt, group, dev)
    finally:
        if saved is None:
            ops.GEMV_TUNED.pop(key, None)
        else:
            ops.GEMV_TUNED[key] = saved


def tinygemm_operands(w, s, z):
    """tinygemm's packed copy of our int4 codes (what torchao int4 weight-only stores) and its scale/zeros."""
    codes = pack_int4(unpack_int4_k32(w))
    packed = torch._convert_weight_to_int4pack(codes, 8)
    zc = kernels.unpack_zero(z.t()).to(torch.bfloat16)
    sr = s.t()
    sz = torch.stack([sr.t(), ((8 - zc) * sr).t()], -1).contiguous().to(torch.bfloat16)
    return packed, sz


def candidates(M: int, N: int, K: int, fmt: int, group: int, dev, retune) -> list[dict]:
    """Launch configurations to try: the sweep for the formats in ``retune`` (``None``: all), else only the one
    ``ops.gemv_config`` picks today (the tuned table), timed for the per-layer figures."""
    if retune is not None and fmt not in retune:
        return [dict(ops.gemv_config(M, N, K, fmt, group, dev), fixed=True)]
    if M != 1:
        return DOT
    return FMA1 + DOT[:1] + (V1 if fmt in (ops.FMT_INT8, ops.FMT_E4M3) else [])


def sweep_shape(N: int, K: int, ms, dev, dtype, res: dict, log, deadline: float, retune=None) -> None:
    torch.manual_seed(N * 7 + K)
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    fm = formats(lin, K)
    ncopy = 2 if dev.type != "cuda" else max(2, min(12, -(-200_000_000 // fm[ops.FMT_INT4_K32][6])))
    copies = {f: [tuple(t.clone() if t is not None else None for t in v[:3]) for _ in range(ncopy)] for f, v in fm.items()}
    wcopies = [lin.weight.clone() for _ in range(max(2, min(ncopy, -(-200_000_000 // (K * N * 2)))))]
    tg = None
    if dev.type == "cuda" and dtype == torch.bfloat16:
        try:
            tg = [tinygemm_operands(*c) for c in copies[ops.FMT_INT4_K32][:max(2, ncopy // 2)]]
        except Exception as e:  # noqa: BLE001 - the reference kernel is optional
            res.setdefault("errors", []).append(["tinygemm", N, K, repr(e)[:200]])
    for M in ms:
        x = torch.randn(M, K, device=dev, dtype=dtype)
        row = {"N": N, "K": K, "M": M, "bf16_us": time_us([lambda w=w: F.linear(x, w) for w in wcopies], dev)}
        row["bf16_GBps"] = K * N * 2 / row["bf16_us"] / 1e3
        if tg:
            row["tinygemm_us"] = time_us([lambda p=p, q=q: torch._weight_int4pack_mm(x, p, 128, q) for p, q in tg], dev)
            row["tinygemm_GBps"] = fm[ops.FMT_INT4_K32][6] / row["tinygemm_us"] / 1e3
        for fmt, (w, s, z, group, gm, dense, nbytes) in fm.items():
            ref = x.float() @ dense.t()
            best = None
            for cand in candidates(M, N, K, fmt, group, dev, retune):
                if time.time() > deadline and not cand.get("fixed"):
                    break
                cfg = ({k: v for k, v in cand.items() if k != "fixed"} if cand.get("fixed")
                       else _concrete(cand, M, N, K, fmt, group, dev))
                if cfg is None:
                    continue
                y = torch.full((M, N), float("nan"), device=dev, dtype=dtype)
                try:
                    ops.launch_gemv(x, w, s, z, fmt, group, gm, y, cfg)
                    err = float((y.float() - ref).norm() / ref.norm())
                    if not err < 1e-2:
                        res.setdefault("bad", []).append([fmt, M, N, K, cfg, err])
                        continue
                    us = time_us([lambda c=c, cfg=cfg: ops.launch_gemv(x, c[0], c[1], c[2], fmt, group, gm,
                                                                        torch.empty_like(y), cfg)
                                  for c in copies[fmt]], dev)
                except Exception as e:  # noqa: BLE001 - a configuration that fails is reported, not fatal
                    res.setdefault("errors", []).append([fmt, M, N, K, cfg, repr(e)[:300]])
                    continue
                row.setdefault(f"f{fmt}_all", []).append([cfg, round(us, 2)])
                if best is None or us < best[0]:
                    best = (us, cfg, err)
            if best:
                us, cfg, err = best
                row.update({f"f{fmt}_us": us, f"f{fmt}_cfg": cfg, f"f{fmt}_relerr": err,
                            f"f{fmt}_GBps": nbytes / us / 1e3, f"f{fmt}_x_bf16": row["bf16_us"] / us})
                key = (fmt, 1 if M == 1 else 16, N, K)
                ops.GEMV_TUNED[key] = cfg
                if retune is None or fmt in retune:
                    res["tuned"][",".join(map(str, key))] = cfg
        res["rows"].append(row)
        log({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
             if not k.endswith("_cfg") and not k.endswith("_all")})


def prefill_layer(N: int, K: int, M: int, dev, dtype, res: dict, log) -> None:
    """Prefill of one layer: bf16 GEMM vs dequantize (+ cuBLAS) for w4/w8, and the fp8 path."""
    torch.manual_seed(N + K)
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    fm = formats(lin, K)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    row = {"N": N, "K": K, "M": M, "bf16_us": time_us([lambda: F.linear(x, lin.weight)] * 2, dev)}
    for fmt in (ops.FMT_INT4_K32, ops.FMT_INT8):
        w, s, z, group, gm, dense, nbytes = fm[fmt]
        deq = ops.dequant(w, s, z, fmt, group, gm, K, dtype)
        row[f"f{fmt}_dequant_exact"] = bool(torch.equal(deq, dense.to(dtype)))
        row[f"f{fmt}_dequant_us"] = time_us([lambda: ops.dequant(w, s, z, fmt, group, gm, K, dtype)] * 2, dev)
        row[f"f{fmt}_dequant_GBps"] = (nbytes + N * K * 2) / row[f"f{fmt}_dequant_us"] / 1e3
        row[f"f{fmt}_dequant_gemm_us"] = time_us(
            [lambda: F.linear(x, ops.dequant(w, s, z, fmt, group, gm, K, dtype))] * 2, dev)
        row[f"f{fmt}_x_bf16"] = row["bf16_us"] / row[f"f{fmt}_dequant_gemm_us"]
    if dev.type == "cuda" and kernels.FP8_OK:
        wq, ws = fm[ops.FMT_E4M3][0], fm[ops.FMT_E4M3][1]
        row["fp8_us"] = time_us([lambda: kernels.fp8_linear(x, wq, ws)] * 2, dev)
        row["fp8_x_bf16"] = row["bf16_us"] / row["fp8_us"]
    res["prefill"].append(row)
    log({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})


def prefill_group(ns, K: int, M: int, dev, dtype, res: dict, log) -> None:
    """Prefill of layers that read one input (q/k/v: ``ns`` = 3 x 4096; gate/up: 2 x 11008): bf16 (one GEMM per
    layer), dequantize + GEMM per layer, and all weights dequantized into one matrix + ONE GEMM
    (``ops.dequant_cat``, what ``kernels.fused_linears`` runs), for w4 and w8."""
    torch.manual_seed(sum(ns) + K)
    lins = [torch.nn.Linear(K, n, bias=False, device=dev, dtype=dtype).requires_grad_(False) for n in ns]
    x = torch.randn(M, K, device=dev, dtype=dtype)
    row = {"Ns": list(ns), "K": K, "M": M,
           "bf16_us": time_us([lambda: [F.linear(x, lin.weight) for lin in lins]] * 2, dev)}
    for fmt, scheme in ((ops.FMT_INT4_K32, "w4"), (ops.FMT_INT8, "w8")):
        mods = [LINEAR_CLASSES[scheme].from_linear(lin, QuantConfig(scheme=scheme)) for lin in lins]
        w, s, z = [m.qweight for m in mods], [m.scale for m in mods], [m.zero for m in mods]
        g, gm = mods[0].group, mods[0].groups_major
        cat = ops.dequant_cat(w, s, z, fmt, g, gm, K, dtype)
        one = torch.cat([ops.dequant(*o, fmt, g, gm, K, dtype) for o in zip(w, s, z)])
        row[f"f{fmt}_cat_exact"] = bool(torch.equal(cat, one))
        row[f"f{fmt}_separate_us"] = time_us(
            [lambda: [F.linear(x, ops.dequant(*o, fmt, g, gm, K, dtype)) for o in zip(w, s, z)]] * 2, dev)
        row[f"f{fmt}_cat_us"] = time_us([lambda: F.linear(x, ops.dequant_cat(w, s, z, fmt, g, gm, K, dtype))] * 2, dev)
        row[f"f{fmt}_separate_x_bf16"] = row["bf16_us"] / row[f"f{fmt}_separate_us"]
        row[f"f{fmt}_cat_x_bf16"] = row["bf16_us"] / row[f"f{fmt}_cat_us"]
    res.setdefault("prefill_groups", []).append(row)
    log({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})


def run(dev, dtype, shapes, prefill_shapes, prefill_m, budget_s: float, log, retune=None, prefill_groups=()) -> dict:
    """``shapes``: ``(N, K, rows list)``, tuned in this order until ``budget_s``; prefill layers after.
    ``retune``: the formats to tune (``None``: all); the others are timed with today's configuration."""
    res = {"timing": "CUDA graph over weight copies > L2, median of 5 replays", "copy_GBps": copy_gbps(dev),
           "rows": [], "prefill": [], "tuned": {}}
    log("copy GB/s", round(res["copy_GBps"]))
    deadline = time.time() + budget_s
    for N, K, ms in shapes:
        if time.time() > deadline:
            log("tune budget: skipping", N, K)
            res.setdefault("skipped", []).append([N, K])
            continue
        sweep_shape(N, K, ms, dev, dtype, res, log, deadline, retune)
    for N, K in prefill_shapes:
        prefill_layer(N, K, prefill_m, dev, dtype, res, log)
    for ns, K in prefill_groups:
        prefill_group(ns, K, prefill_m, dev, dtype, res, log)
    for r in res["rows"]:
        r["fraction_of_copy"] = {f"f{f}": r[f"f{f}_GBps"] / res["copy_GBps"] for f in (5, 8, 9) if f"f{f}_GBps" in r}
    return res


if __name__ == "__main__":
    import json

    smoke = "--smoke" in sys.argv
    dev = torch.device("cpu" if smoke else "cuda")
    if smoke:
        FMA1[:] = [dict(kernel="fma", R=1, T=4, num_warps=1, waves=1, PF=pf) for pf in (0, 1)]
        DOT[:] = [dict(kernel="dot", BLOCK_N=16, TW=16, num_warps=1, num_stages=1, waves=1)]
        out = run(dev, torch.float16, [(32, 256, [1, 4])], [(32, 256)], 32, 60, print,
                  prefill_groups=[((32, 16, 48), 256)])
    else:
        out = run(dev, torch.bfloat16, [(n, k, [1, 8]) for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))],
                  [(11008, 4096)], 2048, 120, print)
    print(json.dumps(out["tuned"], indent=1))
