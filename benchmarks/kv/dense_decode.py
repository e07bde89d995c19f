"""Decode attention over the bf16 static cache, one layer: the dense decode kernel against the masked SDPA it replaces.

For each model shape (7B: 32 query / 32 KV heads x 128; 1B-shaped: 32 / 4 x 64; Qwen-like: 28 / 4 x 128), batch
(1, 8), cache length L (512, 4096) and query position (a short prompt's 128 and the cache's last row): the
masked SDPA exactly as the Generator's compiled layer runs it (``torch.compile(fullgraph=True)`` of
``F.scaled_dot_product_attention(q, k, v, attn_mask=arange(L) <= pos)``, inductor picks the backend) and
:func:`openautoglm.kv.kernels.dense_decode.decode_triton` under its default and a few other launch configurations
(programs per SM, pipeline stages, tile). Each is checked against the float32 reference once (max abs error),
then timed in a CUDA graph (:func:`benchmarks._harness.time_us`: calls rotating over cache copies that together
exceed L2, median of replays). Figures: microseconds, speed-up over SDPA, GB/s over the bytes that must be read (keys
and values ``0..pos``) and the copy rate measured in the same run.

    python -m benchmarks.kv.dense_decode --smoke        # CPU: Triton interpreter, tiny shapes
    python -m benchmarks.kv.dense_decode --out $OUT     # GPU; JSON to $OUT/dense_decode.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__" and "--smoke" in sys.argv:  # before torch and triton are imported: interpret the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._harness import copy_gbps, environment, log, out_dir, time_us, write_json  # noqa: E402
from openautoglm.kv.kernels import dense_decode as dd  # noqa: E402

SHAPES = {"7b": (32, 32, 128), "1b": (32, 4, 64), "qwen": (28, 4, 128)}
CONFIGS = {"default": {}, "per_sm=1": dict(per_sm=1), "per_sm=4": dict(per_sm=4), "stages=3": dict(num_stages=3),
           "stages=1": dict(num_stages=1), "block_n=32": dict(block_n=32), "block_n=128 warps=8":
           dict(block_n=128, num_warps=8)}


def _sdpa(q, k, v, pos, scale):
    L = k.shape[2]
    mask = (torch.arange(L, device=k.device) <= pos.view(-1, 1)).view(1, 1, 1, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def case(shape, batch, L, p, dev, dtype, sdpa, configs, smoke) -> dict:
    H, hkv, D = SHAPES[shape] if not smoke else (8, 2, 32)
    scale = D ** -0.5
    cache_bytes = 2 * batch * hkv * L * D * 2
    copies = 1 if smoke else max(2, min(16, -(-200 * 2 ** 20 // cache_bytes)))  # > 200 MB: past the L2
    g = torch.Generator(device=dev).manual_seed(0)
    qs = [torch.randn(batch, H, 1, D, device=dev, dtype=dtype, generator=g) for _ in range(copies)]
    ks = [torch.randn(batch, hkv, L, D, device=dev, dtype=dtype, generator=g) for _ in range(copies)]
    vs = [torch.randn(batch, hkv, L, D, device=dev, dtype=dtype, generator=g) for _ in range(copies)]
    pos = torch.tensor([p], device=dev)
    ref = _sdpa(qs[0].float(), ks[0].float(), vs[0].float(), pos, scale)
    need = 2 * batch * hkv * (p + 1) * D * 2  # keys and values 0..pos
    row = dict(shape=shape, heads=H, kv_heads=hkv, head_dim=D, batch=batch, L=L, pos=p, bytes_needed=need,
               cache_copies=copies, split_plan=list(dd.split_plan(L, batch * hkv, D, dev)))
    err = float((sdpa(qs[0], ks[0], vs[0], pos, scale).float() - ref).abs().max())
    us = time_us([lambda i=i: sdpa(qs[i], ks[i], vs[i], pos, scale) for i in range(copies)], dev)
    row["sdpa"] = dict(us=us, max_abs_err=err, GBps_needed=need / us / 1e3, GBps_cache=cache_bytes / us / 1e3)
    for name, cfg in configs.items():
        try:
            out = dd.decode_triton(qs[0], ks[0], vs[0], pos, scale, cfg)
            err = float((out.float() - ref).abs().max())
            calls = [lambda i=i, cfg=cfg: dd.decode_triton(qs[i], ks[i], vs[i], pos, scale, cfg) for i in range(copies)]
            us = time_us(calls, dev)
            row[name] = dict(us=us, max_abs_err=err, speedup_vs_sdpa=row["sdpa"]["us"] / us,
                             GBps_needed=need / us / 1e3, split_plan=list(dd.split_plan(L, batch * hkv, D, dev, cfg)))
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is recorded, not fatal
            row[name] = dict(error=repr(e)[:300])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder (default: $OUT/kv, else benchmarks/results/kv)")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS to time")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for knob in ("recompile_limit", "cache_size_limit"):  # one compiled SDPA per case shape, as the Generator has
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    sdpa = torch.compile(_sdpa, fullgraph=True, dynamic=False, backend="inductor" if dev.type == "cuda" else "eager")
    configs = {n: CONFIGS[n] for n in args.configs.split(",")}
    res = dict(**environment(dev), smoke=args.smoke, dense_config=dd.DENSE_CONFIG, configs=configs, copy_GBps=copy_gbps(dev), rows=[])
    log("copy rate", round(res["copy_GBps"]), "GB/s")
    plan = ([("7b", 1, 256, 5), ("7b", 2, 256, 255)] if args.smoke else
            [(s, b, L, p) for s in SHAPES for b in (1, 8) for L in (512, 4096) for p in (128, L - 1)])
    for shape, b, L, p in plan:
        row = case(shape, b, L, p, dev, dtype, sdpa, configs, args.smoke)
        res["rows"].append(row)
        best = min((n for n in configs if "us" in row[n]), key=lambda n: row[n]["us"], default=None)
        log(f"{shape} b{b} L{L} pos{p}: sdpa {row['sdpa']['us']:.2f} us, default "
            f"{row['default'].get('us', float('nan')):.2f} us ({row['default'].get('speedup_vs_sdpa', 0):.2f}x), "
            f"best {best} {row[best]['us'] if best else float('nan'):.2f} us; err {row['default'].get('max_abs_err')}")
    out = Path(args.out or out_dir("kv", args.smoke))
    path = write_json(out / ("dense_decode_smoke.json" if args.smoke else "dense_decode.json"), res)
    print("| shape | batch | L | pos | SDPA us | kernel us (x SDPA) | kernel GB/s of needed bytes | best config |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        d = r["default"]
        best = min((n for n in configs if "us" in r[n]), key=lambda n: r[n]["us"], default="-")
        print(f"| {r['shape']} | {r['batch']} | {r['L']} | {r['pos']} | {r['sdpa']['us']:.2f} | "
              f"{d.get('us', float('nan')):.2f} ({d.get('speedup_vs_sdpa', 0):.2f}x) | {d.get('GBps_needed', 0):.0f} | "
              f"{best} |")
    log("wrote", path)


if __name__ == "__main__":
    main()
