"""Launch configurations of the fused quantized-KV decode kernel, one layer, against bf16 flash decoding.

For each (bits, context, batch) of a 7B-shaped layer (32 KV heads x 128, group 64, residual 128): a static
store filled with random codes/scales, the float reference checked once per configuration (relative error),
then the kernel (decode + reduce) timed in a CUDA graph (median of replays) over store copies that exceed L2.
The bf16 reference is ``scaled_dot_product_attention`` of one query over a bf16 K/V of the same context (what
the static bf16 cache runs). Figures: microseconds, bytes read, GB/s, and the copy rate of the same run.

    python -m benchmarks.kv.kernel_sweep --smoke          # CPU, Triton interpreter, tiny shapes
    python -m benchmarks.kv.kernel_sweep --variants      # H100; JSON to $OUT/kv or benchmarks/results/kv
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

from benchmarks import _harness as H  # noqa: E402
from openautoglm.kv.kernels import ops  # noqa: E402
from openautoglm.kv.static_store import StaticQuantStore  # noqa: E402


def time_us(fns, reps: int = 7) -> float:
    """Median microseconds per call, the calls captured in one CUDA graph (:func:`benchmarks._harness.time_us`)."""
    return H.time_us(fns, torch.device("cuda" if torch.cuda.is_available() else "cpu"), reps)


def make_store(bits, batch, hkv, d, ctx, dev, dtype):
    st = StaticQuantStore(bits, 64, 128, ctx + 64)
    k1 = torch.zeros(batch, hkv, 1, d, device=dev, dtype=dtype)
    st._check(k1, k1)
    for t in (st.kq, st.vq):
        t.random_(0, 256)
    for t in (st.ks, st.vs):
        t.uniform_(0.005, 0.05)
    for t in (st.km, st.vm):
        t.uniform_(-1.0, 0.0)
    for t in (st.rk, st.rv):
        t.normal_()
    st.length_t.fill_(ctx)
    st._host_len = ctx
    return st


def store_bytes(st) -> int:
    return sum(t.numel() * t.element_size() for t in (st.kq, st.ks, st.km, st.vq, st.vs, st.vm, st.rk, st.rv))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None, help="folder (default: $OUT/kv, else benchmarks/results/kv)")
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--quick", action="store_true", help="the defaults, the tl.dot kernel and two vec launches only")
    ap.add_argument("--variants", action="store_true",
                    help="vec kernel: eager/lazy rescaling, byte/word code reads, tiles and programs per SM")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    t0 = time.time()
    if args.smoke:
        hkv, d, cases = 2, 128, [(4, 512, 1), (8, 512, 1)]
        grid = [dict(), dict(vec=False, share_bytes=False, magic=False, per_sm=4, num_warps=8, num_stages=2),
                dict(vec=True, vec_block_n=16, vec_per_sm=1),
                dict(vec=True, vec_block_n=16, vec_per_sm=1, vec_lazy=8.0, vec_words=2)]
    else:
        hkv, d = 32, 128
        cases = [(b, c, n) for c, n in ((8192, 1), (8192, 8), (32768, 1), (32768, 8)) for b in (4, 8)]
        dot = dict(vec=False, per_sm=16, num_warps=4, share_bytes=True, magic=False)  # the tl.dot kernel's defaults
        grid = [dict(), dot, dict(dot, magic=True, share_bytes=False), dict(dot, per_sm=4)]
        grid += [dict(vec=True, vec_block_n=bn, vec_num_warps=nw, vec_per_sm=ps)
                 for bn, nw in ((32, 4), (64, 4), (64, 8)) for ps in (4, 16)]
        if args.quick:
            grid = grid[:2] + [dict(vec_per_sm=16), dict(vec_block_n=32, vec_per_sm=16)]
        if args.variants:  # the first tuned vec kernel against lazy rescaling and word-wide code reads
            old = dict(vec_lazy=0.0, vec_words=0, vec_block_n=64, vec_per_sm=4)
            new = dict(vec_lazy=8.0, vec_words=2, vec_block_n=64, vec_per_sm=4)
            grid = [old, dict(old, vec_lazy=8.0), dict(old, vec_words=2), new, dict(new, vec_words=4)]
            grid += [dict(new, vec_per_sm=ps) for ps in (3, 8, 16)]
            grid += [dict(new, vec_block_n=32, vec_per_sm=ps) for ps in (4, 16)]
    res = {**H.environment(dev), "smoke": args.smoke,
           "defaults": dict(ops.DECODE_CONFIG), "layer": f"{hkv} KV heads x {d}, 32 query heads, group 64, residual 128", "rows": []}
    if dev.type == "cuda":
        res["copy_GBps"] = H.copy_gbps(dev)
        print("copy GB/s", round(res["copy_GBps"]))
    for bits, ctx, batch in cases:
        per = store_bytes(make_store(bits, batch, hkv, d, ctx, dev, dtype)) if dev.type == "cuda" else 1
        ncopy = max(2, min(8, -(-120_000_000 // per))) if dev.type == "cuda" else 1
        stores = [make_store(bits, batch, hkv, d, ctx, dev, dtype) for _ in range(ncopy)]
        q = torch.randn(batch, 32, 1, d, device=dev, dtype=dtype)
        scale = d ** -0.5
        ref = ops.decode_reference(stores[0].view(), q, None, scale).float()
        row = {"bits": bits, "context": ctx, "batch": batch, "bytes": store_bytes(stores[0]), "configs": []}
        kk = [torch.randn(batch, 32, ctx, d, device=dev, dtype=dtype) for _ in range(max(2, min(4, -(-120_000_000 // (batch * 32 * ctx * d * 4)))))]
        vv = [torch.randn_like(k) for k in kk]
        if dev.type == "cuda":
            row["bf16_sdpa_us"] = time_us([lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale)
                                           for k, v in zip(kk, vv)])
            row["bf16_bytes"] = 2 * batch * 32 * ctx * d * 2
            row["bf16_GBps"] = row["bf16_bytes"] / row["bf16_sdpa_us"] / 1e3
        del kk, vv
        best = None
        for cfg in grid:
            if time.time() - t0 > args.budget_s:
                row["skipped_after_budget"] = True
                break
            try:
                got = ops.decode_triton(stores[0].view(), q, None, scale, cfg).float()
                err = float((got - ref).norm() / ref.norm())
                us = time_us([lambda s=s: ops.decode_triton(s.view(), q, None, scale, cfg) for s in stores])
            except Exception as e:  # noqa: BLE001 - a configuration that fails is recorded
                row["configs"].append({"cfg": cfg, "error": repr(e)[:300]})
                continue
            gbps = row["bytes"] / us / 1e3
            row["configs"].append({"cfg": cfg, "us": round(us, 2), "GBps": round(gbps, 1), "rel_err": err})
            if err < 2e-2 and (best is None or us < best["us"]):
                best = {"cfg": cfg, "us": us, "GBps": gbps, "rel_err": err}
        row["default_us"] = row["configs"][0].get("us") if row["configs"] else None
        row["best"] = best
        if best and "bf16_sdpa_us" in row:
            row["best_vs_bf16"] = row["bf16_sdpa_us"] / best["us"]
        res["rows"].append(row)
        print(f"int{bits} ctx {ctx} b{batch}: {row['bytes'] / 1e6:.1f} MB default {row['default_us']} us, best "
              f"{best and round(best['us'], 1)} us ({best and round(best['GBps'])} GB/s) {best and best['cfg']}; "
              f"bf16 sdpa {row.get('bf16_sdpa_us', 0):.1f} us ({row.get('bf16_GBps', 0):.0f} GB/s)", flush=True)
        del stores
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    res["wall_s"] = time.time() - t0
    out = Path(args.out or H.out_dir("kv", args.smoke))
    print("wrote", H.write_json(out / ("kernel_sweep_smoke.json" if args.smoke else "kernel_sweep.json"), res))


if __name__ == "__main__":
    main()
