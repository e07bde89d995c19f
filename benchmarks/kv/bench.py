"""KV-cache compression benchmark.

  python -m benchmarks.kv.bench quality          # CPU: bundled model, held-out text (perplexity, attention, BLEU, bytes)
  python -m benchmarks.kv.bench gpu [--smoke]    # GPU: 7B-shaped random Llama (bytes, decode tok/s, max batch)
  python -m benchmarks.kv.bench plot             # the PNG of a gpu run's JSON

Writes bench_quality.json / bench_gpu.json (+ .png) to ``--out`` (default ``$OUT/kv``, else benchmarks/results/kv).
The two modes live in :mod:`.bench_quality` and :mod:`.bench_gpu` (+ :mod:`.bench_generator`, :mod:`.bench_checks`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from benchmarks._harness import copy_gbps, environment, log, out_dir, print_table, write_json
from benchmarks.kv import bench_checks as checks
from benchmarks.kv import bench_generator as gr
from benchmarks.kv import bench_gpu as g


def run_gpu(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.smoke
    t0 = time.time()
    out = Path(args.out)
    from openautoglm.kv.kernels import ops

    res = {"environment": environment(), "settings": vars(args).copy(), "decode_config": dict(ops.DECODE_CONFIG)}
    res["model"] = "SMOKE tiny random Llama (not a result)" if smoke else \
        "random Llama, Llama-2-7B shapes (32 layers, 32 KV heads x 128, bf16)"

    def save():
        res["elapsed_s"] = time.time() - t0
        write_json(out, res, indent=2)

    reason = g.quanto_available()
    res["hf_quantized_cache"] = {"backend": "quanto", "available": reason is None, "reason": reason,
                                 "note": "quanto's CUDA extension is not built (minutes of JIT); its pure-torch unpack is used"}
    res["copy_gb_s"] = copy_gbps(device)
    res["kernel_checks"] = checks.run(device, smoke=smoke)
    save()
    log("checks done")
    model = g.build_model(smoke, device)
    n_full = model.config.num_hidden_layers
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    embed = model.get_input_embeddings().weight
    other = sum(p.numel() * p.element_size() for p in model.parameters()) - n_full * layer_bytes
    res["weights_bytes"] = other + n_full * layer_bytes
    other -= embed.numel() * embed.element_size()  # a decode step reads one embedding row per sequence
    res["decode_layers"] = args.layers
    g.use_layers(model, args.layers)
    weights_step = other + args.layers * layer_bytes
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    kinds = ["bf16-static", "int8", "int4", "int4+share25", "hf-bf16-static"] + \
        (["hf-quanto-int4"] if res["hf_quantized_cache"]["available"] else [])
    res["decode"] = {}
    for ctx in contexts:
        for b in batches:
            for kind in kinds:
                key = f"{kind}@{ctx}x{b}"
                if time.time() - t0 > args.budget_s:
                    res["decode"][key] = "skipped: time budget"
                    continue
                try:
                    fn = gr.generator_row if kind in g.GENERATOR else g.decode_row
                    row = fn(model, kind, b, ctx, args.steps, device, weights_step)
                except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                    row = {"error": repr(e)[:400]}
                    g.free_memory()
                res["decode"][key] = row
                base = res["decode"].get(f"bf16-static@{ctx}x{b}", {})
                if "tokens_per_s" in row and "tokens_per_s" in base:
                    row["vs_bf16_static"] = row["tokens_per_s"] / base["tokens_per_s"]
                log(key, {k: row.get(k) for k in ("tokens_per_s", "vs_bf16_static", "kv_bytes", "error")})
                save()
    g.use_layers(model, n_full)
    res["max_batch"] = {}
    for ctx in contexts:
        for kind in args.max_batch_kinds.split(","):
            key = f"{kind}@{ctx}"
            if time.time() - t0 > args.budget_s:
                res["max_batch"][key] = "skipped: time budget"
                continue
            try:
                per_seq = g.per_sequence_bytes(model, kind, ctx, device)
                row = g.max_batch(model, kind, ctx, device, per_seq, time_steps=args.max_batch_steps,
                                  cap=4 if smoke else 1024)
            except Exception as e:  # noqa: BLE001
                row = {"error": repr(e)[:400]}
                g.free_memory()
            res["max_batch"][key] = row
            log("max batch", key, row)
            save()
    if args.profile:
        res["profile"] = gr.profile_step(model, args.profile, device, weights_step)
        save()
    summarize_gpu(res)
    save()
    return res


def summarize_gpu(res: dict) -> None:
    rows = []
    for key, r in res.get("decode", {}).items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            rows.append([key, f"{r['tokens_per_s']:.1f}", f"{r.get('vs_bf16_static', float('nan')):.2f}",
                         f"{r['kv_bytes'] / 2**30:.3f}", f"{r.get('achieved_gb_s', 0):.0f}", r.get("graph")])
        else:
            rows.append([key, str(r)[:60], "", "", "", ""])
    print_table(f"decode ({res.get('decode_layers')} layers)", ["cache@context x batch", "tok/s", "vs bf16 static",
                "KV GiB", "GB/s", "graph"], rows)
    rows = []
    for key, r in res.get("max_batch", {}).items():
        if isinstance(r, dict) and "max_batch" in r:
            bf = res["max_batch"].get(f"bf16-static@{r['context']}", {})
            ratio = r["max_batch"] / bf["max_batch"] if isinstance(bf, dict) and bf.get("max_batch") else float("nan")
            agg = r.get("tokens_per_s", float("nan"))
            agg_ratio = agg / bf["tokens_per_s"] if isinstance(bf, dict) and bf.get("tokens_per_s") else float("nan")
            r["vs_bf16_batch"], r["vs_bf16_aggregate"] = ratio, agg_ratio
            rows.append([key, r["max_batch"], r.get("verified_upper"), f"{ratio:.2f}", f"{agg:.1f}", f"{agg_ratio:.2f}"])
        else:
            rows.append([key, str(r)[:60], "", "", "", ""])
    print_table("largest batch (full model, one real decode step)", ["cache@context", "max batch", "verified",
                "vs bf16", "aggregate tok/s", "vs bf16"], rows)


def plot_gpu(path: Path) -> Path:
    """PNG next to the GPU JSON: decode tokens/s vs the bf16 static cache, and the largest batch that fits."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(path.read_text())
    kinds = ["int8", "int4", "int4+share25", "hf-bf16-static", "hf-quanto-int4"]
    shapes = sorted({k.split("@")[1] for k in d["decode"]}, key=lambda s: [int(x) for x in s.split("x")])
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ys = [d["decode"].get(f"{kind}@{s}", {}).get("vs_bf16_static", float("nan")) for s in shapes]
        ax[0].bar([j + i * w for j in range(len(shapes))], ys, w, label=kind)
    ax[0].axhline(1.0, color="k", lw=0.8)
    ax[0].set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))], [s.replace("x", " x b") for s in shapes])
    ax[0].set(ylabel="decode tokens/s vs bf16 static (Generator)", title=f"7B-shaped, {d['decode_layers']} layers, H100")
    ax[0].legend(fontsize=8)
    mk = ["bf16-static", "int8", "int4", "int4+share25"]
    ctxs = sorted({int(k.split("@")[1]) for k in d["max_batch"]})
    for i, kind in enumerate(mk):
        ys = [d["max_batch"].get(f"{kind}@{c}", {}).get("max_batch", 0) for c in ctxs]
        ax[1].bar([j + i * 0.2 for j in range(len(ctxs))], ys, 0.2, label=kind)
    ax[1].set_xticks([j + 0.3 for j in range(len(ctxs))], [f"{c // 1024}k context" for c in ctxs])
    ax[1].set(ylabel="largest batch (80 GB, full 7B, one decode step)", title="sequences that fit")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["gpu", "quality", "plot"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    ap.add_argument("--out", default=None, help="the JSON file (default: in $OUT/kv, else in benchmarks/results/kv)")
    ap.add_argument("--steps", type=int, default=32, help="gpu: decode steps per timing (median of 3)")
    ap.add_argument("--layers", type=int, default=8, help="gpu: decoder layers in the decode-speed rows")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budget-s", type=float, default=480.0, help="gpu: skip what is left after this many seconds")
    ap.add_argument("--max-batch-kinds", default="bf16-static,int8,int4,int4+share25")
    ap.add_argument("--max-batch-steps", type=int, default=8)
    ap.add_argument("--profile", default="", help="gpu: kind@contextxbatch to profile one decode step (kernels)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="quality: held-out tokens for perplexity")
    ap.add_argument("--prompts", type=int, default=8, help="quality: prompts for BLEU")
    ap.add_argument("--sections", default="bytes,ppl,share,attention,bleu", help="quality: what to measure")
    ap.add_argument("--decode-config", default="", help="gpu: JSON of ops.DECODE_CONFIG keys to launch the "
                    "decode kernels with (default: the library's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.decode_config:
        from openautoglm.kv.kernels import ops

        cfg = json.loads(args.decode_config)
        unknown = set(cfg) - set(ops.DECODE_CONFIG)
        if unknown:
            raise ValueError(f"--decode-config keys {sorted(unknown)} are not in ops.DECODE_CONFIG")
        ops.DECODE_CONFIG.update(cfg)
    folder = out_dir("kv", args.smoke)
    if args.mode == "plot":
        print(plot_gpu(Path(args.out or folder / "bench_gpu.json")))
        return
    if args.mode == "gpu":
        if args.smoke:
            args.contexts, args.batches, args.layers, args.steps = "512,1024", "1,2", 2, 4
        args.out = args.out or str(folder / ("bench_gpu_smoke.json" if args.smoke else "bench_gpu.json"))
        run_gpu(args)
    else:
        from benchmarks.kv import bench_quality as q

        args.out = args.out or str(folder / "bench_quality.json")
        q.run(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
