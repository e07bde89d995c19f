"""Mixture-of-experts models on one GPU: weight bytes, decode and prefill speed, quality vs bf16, estimate vs peak.

Rows (``--only SHAPE:VARIANT,...``; default every row of ``--shapes``, each started only if its estimated time fits
``--budget-s``; the JSON is rewritten after every row):

* ``qwen3-30b-a3b`` (48 layers, 128 experts, top-8, hidden 2048, expert width 768; 30.5 B parameters, 3.3 B active,
  61 GB in bf16): ``bf16``, ``w4``, ``w8``, ``w8a8``;
* ``mixtral-8x7b`` (46.7 B, 12.9 B active): bf16 takes 93 GB and does not fit one 80 GB GPU (the row records the
  estimate only); ``w4`` and ``w8`` are built one decoder layer at a time and quantized as they are made.

Each row: build the random-weight model on the GPU (:mod:`benchmarks.moe.models`); weight bytes and the estimator's
figure for them; the peak of a 2048-token prefill with transformers' forward (DynamicCache, last logits) against
``estimate_memory(model, batch=1, seq_len=2048)``; decode tokens/s at batch 1 and 8 through
:class:`~openautoglm.generation.generator.Generator` (static cache, compiled layer, CUDA graph; prompt ``--prompt``,
``--new`` tokens, best of two after a first call) and through ``model.generate(cache_implementation="static")``
(routed to the same decode; ``--hf-loop`` also times transformers' own loop); prefill of ``--prefill`` tokens (GPU
time); against bf16 (the bf16 layers rebuilt from the same seeds, one at a time): cosine of the logits at every
position of a 64-token prompt and teacher-forced greedy agreement (the top-1 token equal at each position). Random
weights: the quality figures say the quantized model computes what the bf16 one does, not how good either is.

    python -m benchmarks.moe.bench --only qwen3-30b-a3b:bf16           # GPU: one row per call fits 10 minutes
    python -m benchmarks.moe.bench --only qwen3-30b-a3b:w4 --merge benchmarks/results/moe/bench.json
    python -m benchmarks.moe.bench --smoke                               # CPU, tiny shapes, ~30 s of CPU time
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch

from benchmarks._harness import T0, copy_gbps, environment, log, out_dir, print_table, sync, write_json
from benchmarks.moe import models
from benchmarks.quant.speed_lib import prefill_ms
from openautoglm import QuantConfig
from openautoglm.generation.generator import Generator
from openautoglm.memory import estimate_memory, model_bytes
from openautoglm.memory.moe import moe_layers

VARIANTS = {"qwen3-30b-a3b": ["bf16", "w4", "w8", "w8a8"], "mixtral-8x7b": ["bf16", "w4", "w8"],
            "smoke-qwen3": ["bf16", "w4"], "smoke-mixtral": ["w4"]}
FITS_BF16 = {"mixtral-8x7b": False}
EST_S = {"bf16": 300, "w4": 420, "w8": 420, "w8a8": 420}  # a row's seconds on the H100 (first calls compile)


def quant_config(variant: str) -> QuantConfig | None:
    if variant == "bf16":
        return None
    return QuantConfig(scheme="w8a8-fp8" if variant == "w8a8" and torch.cuda.is_available() else variant)


def _prompt(batch, length, dev, vocab, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), device=dev, generator=g)


def decode_bytes(model) -> int:
    """Weight bytes one decode step at batch 1 reads: everything but the input embedding, and of each MoE layer's
    experts only the k routed ones."""
    layers = moe_layers(model)
    unused = sum(L.bytes * (1 - L.top_k / L.experts) for L in layers)
    emb = model.get_input_embeddings().weight
    return int(model_bytes(model) - emb.numel() * emb.element_size() - unused)


@torch.no_grad()
def peak_vs_estimate(model, dev, tokens: int) -> dict:
    ids = _prompt(1, tokens, dev, model.config.vocab_size, 5)
    est = estimate_memory(model, mode="inference", batch=1, seq_len=tokens, device=dev.type)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync()
        peak = torch.cuda.max_memory_allocated()
    else:
        from openautoglm.memory import MemoryProfiler

        with MemoryProfiler("cpu", model=model) as prof:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        peak = prof.peak_bytes
    return {"tokens": tokens, "estimate_bytes": est.total, "measured_peak_bytes": peak,
            "estimate_over_measured": est.total / peak, "estimate_terms": est.terms, "phase": est.phase}


@torch.no_grad()
def quality(model, shape: str, dev, ref: torch.Tensor, ids: torch.Tensor) -> dict:
    logits = model(ids, use_cache=False).logits[0].float()
    cos = torch.nn.functional.cosine_similarity(logits, ref, dim=-1)
    return {"prompt_tokens": ids.shape[1], "logits_cosine_mean": float(cos.mean()), "logits_cosine_min": float(cos.min()),
            "logits_cosine_last": float(cos[-1]),
            "greedy_agreement_teacher_forced": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}


def decode(model, dev, args, batches) -> dict:
    out = {}
    gen = Generator(model)
    for b in batches if "decode" in args.parts else ():
        p = _prompt(b, args.prompt, dev, model.config.vocab_size, b)
        first = gen.generate(p, args.new)
        runs = [gen.generate(p, args.new) for _ in range(args.reps)]
        best = max(runs, key=lambda r: r.tokens_per_s)
        out[f"decode_b{b}"] = {"tokens_per_s": best.tokens_per_s, "runs": [r.tokens_per_s for r in runs],
                               "first_call_compile_s": first.compile_s,
                               "same_tokens": all(torch.equal(r.tokens, first.tokens) for r in runs)}
        log(f"decode b{b}", round(best.tokens_per_s, 2), "tok/s")
    if "prefill" not in args.parts:
        return out
    pids = _prompt(1, args.prefill, dev, model.config.vocab_size, 3)
    pf = prefill_ms(gen, pids, reps=args.reps + 1)
    out["prefill_ms"], out["prefill_runs"] = pf.pop("ms"), pf
    log("prefill", args.prefill, round(out["prefill_ms"], 2), "ms")
    del gen
    return out


def generate(model, dev, args) -> dict:
    from openautoglm.generation import enable_fast_generate
    from openautoglm.generation.routing import routed

    p = _prompt(1, args.prompt, dev, model.config.vocab_size, 11)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, cache_implementation="static",
              pad_token_id=0)
    r = {}
    paths = [("routed", True)] + ([("transformers", False)] if args.hf_loop else [])
    for name, on in paths:
        enable_fast_generate(model, enabled=on, allow_cpu=dev.type == "cpu")
        t = time.perf_counter()
        first = model.generate(p, **kw)
        sync()
        calls = []
        for _ in range(args.reps):
            t1 = time.perf_counter()
            out = model.generate(p, **kw)
            sync()
            calls.append(time.perf_counter() - t1)
        r[name] = {"first_call_s": time.perf_counter() - t - sum(calls), "tokens_per_s": args.new / min(calls),
                   "same_tokens": bool(torch.equal(out, first))}
        if on:
            r[name]["calls"] = dict(routed(model).counts)
        log("generate", name, round(r[name]["tokens_per_s"], 2), "tok/s")
    enable_fast_generate(model, allow_cpu=dev.type == "cpu")
    return r


def row(shape: str, variant: str, dev, args, copy_rate: float) -> dict:
    r = {"shape": shape, "variant": variant}
    if variant == "bf16" and not FITS_BF16.get(shape, True):
        est = estimate_memory(models.config(shape), mode="inference", batch=1, seq_len=args.prefill, dtype="bf16")
        r.update(skipped=f"bf16 weights {est.terms['weights'] / 1e9:.1f} GB do not fit one "
                         f"{torch.cuda.get_device_properties(dev).total_memory / 1e9:.0f} GB GPU" if dev.type == "cuda"
                 else "bf16 does not fit one 80 GB GPU", estimate_bf16_weight_bytes=est.terms["weights"])
        return r
    ids = _prompt(1, 64, dev, models.SHAPES[shape]["vocab_size"], 7)
    ref = None
    if variant != "bf16":  # the bf16 model's logits, its layers rebuilt one at a time from the same seeds
        t = time.perf_counter()
        ref = models.layerwise_logits(shape, ids, dev) if "quality" in args.parts else None
        r["reference_s"] = time.perf_counter() - t
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    t = time.perf_counter()
    model = models.build(shape, dev, quant_config(variant))
    sync()
    r["build_s"] = time.perf_counter() - t
    r["scheme"] = getattr(getattr(model, "quant_result", None), "config", None) and model.quant_result.config.scheme \
        or (quant_config(variant).scheme if variant != "bf16" else "bf16")
    r["weight_bytes"] = model_bytes(model)
    r["weight_bytes_estimate"] = estimate_memory(model, mode="inference", seq_len=1).terms["weights"]
    r["decode_read_bytes_b1"] = decode_bytes(model)
    r["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    log(shape, variant, "weights", round(r["weight_bytes"] / 1e9, 2), "GB; build", round(r["build_s"], 1), "s")
    if ref is not None:
        r["quality_vs_bf16"] = quality(model, shape, dev, ref, ids)
        log("quality", r["quality_vs_bf16"])
    if "memory" in args.parts:
        r["memory_prefill"] = peak_vs_estimate(model, dev, args.prefill)
        log("estimate / measured peak", round(r["memory_prefill"]["estimate_over_measured"], 4))
    r.update(decode(model, dev, args, args.batches))
    if "decode_b1" in r:
        r["decode_b1"]["weights_gbps"] = r["decode_b1"]["tokens_per_s"] * r["decode_read_bytes_b1"] / 1e9
        r["decode_b1"]["of_copy_rate"] = r["decode_b1"]["weights_gbps"] / copy_rate if copy_rate else None
    if "generate" in args.parts:
        r["generate_b1"] = generate(model, dev, args)
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


def ratios(res: dict) -> None:
    """Each variant against the bf16 row of its shape (same call), and the targets of issue 24."""
    for shape, rows in res["shapes"].items():
        base = next((r for r in rows if r["variant"] == "bf16" and "weight_bytes" in r), None)
        for r in rows:
            if base is None or r is base or "weight_bytes" not in r:
                continue
            x = {"weight_bytes": r["weight_bytes"] / base["weight_bytes"],
                 **{k: r[k]["tokens_per_s"] / base[k]["tokens_per_s"] for k in r if k.startswith("decode_b") and k in base}}
            if "prefill_ms" in r and "prefill_ms" in base:
                x["prefill"] = base["prefill_ms"] / r["prefill_ms"]
            if "generate_b1" in r and "generate_b1" in base:
                x["generate_b1"] = r["generate_b1"]["routed"]["tokens_per_s"] / base["generate_b1"]["routed"]["tokens_per_s"]
            if r.get("device") != base.get("device"):
                x["note"] = f"rows measured on different devices: {r.get('device')} vs {base.get('device')}"
            r["x_bf16"] = x


def table(res: dict) -> None:
    rows = []
    for shape, rs in res["shapes"].items():
        for r in rs:
            if "weight_bytes" not in r:
                rows.append([shape, r["variant"], r.get("skipped") or r.get("error", "")[:60], "", "", "", "", ""])
                continue
            x = r.get("x_bf16", {})
            q = r.get("quality_vs_bf16", {})
            b1, bn = (f"decode_b{b}" for b in (res["args"]["batches"][0], res["args"]["batches"][-1]))
            def fig(key, fmt, ratio=None):
                v = r.get(key)
                v = v.get("tokens_per_s") if isinstance(v, dict) else v
                if v is None:
                    return "-"
                return f"{v:{fmt}}" + (f" ({x[ratio or key]:.2f}x)" if (ratio or key) in x else "")

            rows.append([shape, r["variant"], f"{r['weight_bytes'] / 1e9:.2f} GB" + (f" ({x['weight_bytes']:.3f}x)" if x else ""),
                         fig(b1, ".1f"), fig(bn, ".1f"), fig("prefill_ms", ".1f", "prefill"),
                         f"{q.get('logits_cosine_mean', float('nan')):.4f} / {q.get('greedy_agreement_teacher_forced', float('nan')):.3f}",
                         f"{r['memory_prefill']['estimate_over_measured']:.4f}" if "memory_prefill" in r else "-"])
    print_table(f"MoE on {res.get('device')}", ["shape", "variant", "weights",
                f"tok/s b{res['args']['batches'][0]}", f"tok/s b{res['args']['batches'][-1]}",
                f"prefill {res['args']['prefill']} ms", "cos / greedy vs bf16", "est/peak"], rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--only", default=None, help="comma-separated SHAPE:VARIANT rows")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--hf-loop", action="store_true", help="also time transformers' own generate loop")
    ap.add_argument("--reps", type=int, default=2, help="timed calls after the first (the best is kept)")
    ap.add_argument("--parts", default="quality,memory,decode,prefill,generate",
                    help="what each row measures (a subset keeps a big row within one call)")
    ap.add_argument("--merge", default=None, help="a previous bench.json: its rows are kept (same shape:variant "
                    "replaced), so rows from several calls end in one file with their ratios")
    ap.add_argument("--budget-s", type=float, default=560.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the same code, < 60 s)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.shapes, args.prompt, args.new, args.prefill, args.batches = "smoke-qwen3,smoke-mixtral", 8, 4, 64, "1,2"
        args.reps = 1
    args.batches = [int(b) for b in args.batches.split(",")]
    args.parts = set(args.parts.split(","))
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    plan = [(s, v) for s in args.shapes.split(",") for v in VARIANTS[s]]
    if args.only:
        want = set(args.only.split(","))
        plan = [p for p in plan if f"{p[0]}:{p[1]}" in want]
    out = out_dir("moe", args.smoke) if args.out is None else Path(args.out)
    env = environment(dev)
    res = {"benchmark": "benchmarks.moe.bench", **env, "args": {**vars(args), "parts": sorted(args.parts)},
           "copy_gbps": copy_gbps(dev), "shapes": {}, "skipped_rows": []}
    if args.merge:
        old = json.loads(Path(args.merge).read_text())
        for shape, rows in old.get("shapes", {}).items():
            res["shapes"][shape] = [r for r in rows if (shape, r["variant"]) not in plan]
    path = out / ("bench_smoke.json" if args.smoke else "bench.json")
    for shape, variant in plan:
        left = args.budget_s - (time.time() - T0)
        if dev.type == "cuda" and EST_S[variant] > left:
            res["skipped_rows"].append(f"{shape}:{variant} (needs ~{EST_S[variant]} s, {left:.0f} s left)")
            continue
        log("row", shape, variant)
        try:
            r = row(shape, variant, dev, args, res["copy_gbps"])
        except Exception as e:  # noqa: BLE001 - record the failure, keep the other rows
            r = {"shape": shape, "variant": variant, "error": repr(e)[:500], "traceback": traceback.format_exc()[-3000:]}
            log("row failed", shape, variant, repr(e)[:200])
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        r.update(device=env.get("device"), date=env.get("date"), git_commit=env.get("git_commit"))
        res["shapes"].setdefault(shape, []).append(r)
        ratios(res)
        write_json(path, res)
    table(res)
    log("wrote", path)
    return res


if __name__ == "__main__":
    main()
