"""KV-cache compression benchmark.

  python benchmarks/kv_bench.py quality            # CPU: bundled model, held-out text (perplexity, attention, BLEU, bytes)
  python benchmarks/kv_bench.py gpu [--smoke]      # GPU: 7B-shaped random Llama (bytes, decode tok/s, max batch)

Writes benchmarks/results/kv_bench_quality.json and kv_bench_gpu.json (or --out).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_bench_common import RESULTS, environment, print_table, write_json  # noqa: E402


def run_gpu(args) -> dict:
    import kv_bench_gpu as g

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    t0 = time.time()
    res = {"environment": environment(), "model": "random Llama, Llama-2-7B shapes (32 layers, 32 KV heads x 128, bf16)"}
    if args.smoke:
        res["model"] = "SMOKE tiny random Llama (not a result)"
    reason = g.quanto_available()
    res["hf_quantized_cache"] = {"backend": "quanto", "available": reason is None, "reason": reason,
                                 "note": "quanto's CUDA extension is not built (minutes of JIT); its pure-torch unpack is used"}
    model = g.build_model(args.smoke, device)
    res["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    contexts = [256, 512, 1024] if args.smoke else [2048, 8192, 32768]
    dctx = 512 if args.smoke else 8192
    chunk = 128 if args.smoke else 4096
    kinds = ["bf16-dynamic", "int8", "int4", "int2"] + (["hf-quanto-int4"] if reason is None else [])
    out = Path(args.out)

    def save():
        res["elapsed_s"] = time.time() - t0
        write_json(out, res)

    sections = set(args.sections.split(","))
    # warm-up: compile the dequantize kernels once, outside every timing
    g.decode_speed(model, ["int4", "int8"], 300 if not args.smoke else 200, 2, chunk, device)
    decode_kinds = ["bf16-dynamic", "bf16-static", "int4", "int8"] + (kinds[4:] if "quanto" in sections else [])
    res["decode"] = g.decode_speed(model, decode_kinds, dctx, args.steps, chunk, device)
    base = res["decode"]["bf16-dynamic"]["tokens_per_s"]
    for v in res["decode"].values():
        v["vs_bf16_dynamic"] = v["tokens_per_s"] / base
        v["vs_bf16_static"] = v["tokens_per_s"] / res["decode"]["bf16-static"]["tokens_per_s"]
    save()
    res["decode_batch8"] = g.decode_speed(model, ["bf16-dynamic", "bf16-static", "int4"], dctx, args.steps // 2, chunk,
                                          device, batch=8)
    for v in res["decode_batch8"].values():
        v["vs_bf16_dynamic"] = v["tokens_per_s"] / res["decode_batch8"]["bf16-dynamic"]["tokens_per_s"]
        v["vs_bf16_static"] = v["tokens_per_s"] / res["decode_batch8"]["bf16-static"]["tokens_per_s"]
    save()
    if "bytes" in sections:
        res["kv_bytes"] = g.kv_bytes(model, kinds, contexts, chunk, device)
    key = "allocated_delta" if device == "cuda" else "cache_storage"  # no allocator statistics on the CPU
    for row in res.get("kv_bytes", {}).values():
        row["bytes"] = row[key]
    for row in res.get("kv_bytes", {}).values():
        row["vs_bf16"] = row["bytes"] / res["kv_bytes"][f"bf16-dynamic@{row['context']}"]["bytes"]
    save()
    res["max_batch"] = {}
    for ctx in ([512] if args.smoke else [8192, 32768]):
        for kind in args.max_batch_kinds.split(","):
            if "maxbatch" not in sections:
                break
            if time.time() - t0 > args.budget_s:
                res["max_batch"][f"{kind}@{ctx}"] = "skipped: time budget"
                continue
            per_tok = args.bytes_per_token.get(kind) or res["kv_bytes"][f"{kind}@{contexts[1]}"]["bytes"] / contexts[1]
            res["max_batch"][f"{kind}@{ctx}"] = g.max_batch(model, kind, ctx, per_tok, min(chunk, 1024), device)
            print(f"max batch {kind}@{ctx}: {res['max_batch'][f'{kind}@{ctx}']}", flush=True)
            save()
    save()
    print_table("decode at %d context (batch 1)" % dctx, ["cache", "tok/s", "vs bf16 dynamic", "vs bf16 static"],
                [[k, f"{v['tokens_per_s']:.1f}", f"{v['vs_bf16_dynamic']:.2f}", f"{v['vs_bf16_static']:.2f}"]
                 for k, v in res["decode"].items()])
    print_table("KV bytes (allocated)", ["cache@context", "bytes", "vs bf16"],
                [[k, v["bytes"], f"{v['vs_bf16']:.3f}"] for k, v in res.get("kv_bytes", {}).items()])
    return res


def plot_gpu(path: Path) -> Path:
    """PNG next to the GPU JSON: KV bytes vs context, decode tokens/s at 8k (first run)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(path.read_text())["runs"]["run1"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [2048, 8192, 32768]
    for kind in ["bf16-dynamic", "int8", "int4", "int2", "hf-quanto-int4"]:
        ax[0].plot(xs, [d["kv_bytes"][f"{kind}@{c}"]["bytes"] / 2**30 for c in xs], marker="o", label=kind)
    ax[0].set_xscale("log", base=2)
    ax[0].set(xlabel="context (tokens)", ylabel="KV cache GiB (allocated)", title="7B-shaped Llama, batch 1, H100")
    ax[0].legend()
    names = list(d["decode"])
    ax[1].bar(names, [d["decode"][n]["tokens_per_s"] for n in names])
    ax[1].set(ylabel="tokens/s", title="decode at 8k context, batch 1 (run 1, eager dequantize)")
    ax[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["gpu", "quality", "plot"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=130, help="decode steps timed (more than one 128-token residual window)")
    ap.add_argument("--budget-s", type=float, default=170.0, help="skip max-batch searches after this many seconds")
    ap.add_argument("--sections", default="decode,quanto,bytes,maxbatch", help="gpu: what to measure")
    ap.add_argument("--max-batch-kinds", default="bf16-dynamic,int8,int4,int2")
    ap.add_argument("--bytes-per-token", default="", help="gpu: kind=bytes,... from an earlier run (skips 'bytes')")
    ap.add_argument("--max-tokens", type=int, default=16384, help="quality: held-out tokens for perplexity")
    ap.add_argument("--prompts", type=int, default=8, help="quality: prompts for BLEU")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.bytes_per_token = {k: float(v) for k, v in (x.split("=") for x in args.bytes_per_token.split(",") if x)}
    if args.mode == "plot":
        print(plot_gpu(Path(args.out or RESULTS / "kv_bench_gpu.json")))
        return
    if args.mode == "gpu":
        args.out = args.out or str(RESULTS / ("kv_bench_gpu_smoke.json" if args.smoke else "kv_bench_gpu.json"))
        run_gpu(args)
    else:
        import kv_bench_quality as q

        args.out = args.out or str(RESULTS / "kv_bench_quality.json")
        q.run(args, environment(), write_json, print_table)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
