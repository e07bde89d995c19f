"""compress_to_budget against the best single uniform recipe, on the bundled model (CPU).

Setting: open-autoglm-base in its checkpoint dtype (bf16), serving context 2048 (its trained context) at batch 8.
The *footprint* is bf16 weights + the bf16 KV cache at that batch and context, from the
estimator (104.9 MB here); budgets are 60 / 40 / 25 % of it and constrain those two terms
(``budget_terms=("weights", "kv_cache")``, no headroom).

For each budget: the auto pick (``compress_to_budget``: measured sensitivities on 4096 calibration tokens from
the held-out text's second half, knapsack, top-4 verified together) and every *uniform* recipe -- one weight
option for all Linears, one KV width for all layers, one head-pruning level -- that fits. Uniform recipes that
fit and are not dominated (no other fitting one keeps at least as many bytes in every knob) are all evaluated
(the method's predictions do not choose the baseline), plus the three best-predicted; the best of them by held-out
perplexity is "the best uniform". Held-out
perplexity: 16384 tokens (8 windows of 2048) of the held-out text's first half, as a token-by-token decode
through the recipe's KV cache (``kv.emulate.decode_perplexity``, equal to the real cache fed token by token).
Each recipe is applied for real to a fresh copy of the model (``apply_recipe``).

Targets: the auto pick is never worse than the best uniform; at 25 % its perplexity increase is at least 10 %
smaller than the best uniform's.

    python -m benchmarks.auto.bench            # ~30-60 min on 2 CPU cores; writes benchmarks/results/auto/bench.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks._harness import ROOT, environment, out_dir, write_json
from openautoglm import hub
from openautoglm.auto import apply_recipe, compress_to_budget
from openautoglm.auto.api import candidate_recipe
from openautoglm.auto.space import WEIGHT_OPTIONS
from openautoglm.evaluate import heldout_token_ids
from openautoglm.kv.emulate import decode_perplexity
from openautoglm.memory import estimate_memory

MODEL, CONTEXT, BATCH = "open-autoglm-base", 2048, 8
TERMS = ("weights", "kv_cache")
WEIGHT_RANK = {"bf16": 5, "w8": 4, "w4g32": 3, "w4g64": 2, "w4g128": 1}


def knobs(r, c) -> tuple:
    """(weight option rank, KV bits, -pruning): larger = fewer bytes saved on that knob."""
    kv = r.kv_options[c.kv[0]]
    return (WEIGHT_RANK[r.options[c.weights[0]]], 16 if kv is None else kv, -c.ratio)


def not_dominated(r, fits) -> list:
    out = []
    for c in fits:
        k = knobs(r, c)
        if not any(d is not c and all(a >= b for a, b in zip(knobs(r, d), k)) and knobs(r, d) != k for d in fits):
            out.append(c)
    return out


def heldout(recipe, eval_ids, dtype) -> float:
    m = hub.from_pretrained(MODEL, dtype=dtype)
    kv = apply_recipe(m, recipe)
    return decode_perplexity(m, kv, token_ids=eval_ids, seq_len=CONTEXT).perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0.60,0.40,0.25")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--report-budget", type=float, default=None,
                    help="also write a report for this budget fraction (into bench_report/ next to --out)")
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"))
    ap.add_argument("--out", default=None, help="the JSON (default: bench.json in $OUT/auto, else in benchmarks/results/auto)")
    args = ap.parse_args()
    args.out = Path(args.out) if args.out else out_dir("auto") / "bench.json"
    torch.manual_seed(0)
    dtype = "bfloat16"
    tok = hub.load_tokenizer(MODEL)
    ids = heldout_token_ids(tok)
    eval_ids = ids[: ids.numel() // 2][: args.eval_tokens]
    est = estimate_memory(MODEL, batch=BATCH, seq_len=CONTEXT, dtype="bf16")
    footprint = est.terms["weights"] + est.terms["kv_cache"]
    t0 = time.perf_counter()
    base_ppl = decode_perplexity(hub.from_pretrained(MODEL, dtype=dtype), None, token_ids=eval_ids, seq_len=CONTEXT).perplexity
    rows = []
    for pct in [float(x) for x in args.budgets.split(",")]:
        budget = int(pct * footprint)
        model = hub.from_pretrained(MODEL, dtype=dtype)
        t = time.perf_counter()
        example = args.report_budget is not None and abs(pct - args.report_budget) < 1e-9
        r = compress_to_budget(model, budget, context=CONTEXT, batch=BATCH, tokenizer=tok, budget_terms=TERMS,
                               headroom=0.0, calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens,
                               cache_dir=args.cache, measure_memory=True, n_prompts=4, new_tokens=48)
        t_auto = time.perf_counter() - t
        if example:
            r.write_report(args.out.parent / "bench_report",
                           title=f"{MODEL}: {pct:.0%} of the bf16 footprint (weights + KV) at batch {BATCH} x context {CONTEXT}")
        auto_ppl = r.quality["perplexity"]
        fits = [c for c in r.uniform if c.bytes <= budget]
        pool = {c.key(): c for c in not_dominated(r, fits)}
        pool.update({c.key(): c for c in sorted(fits, key=lambda c: c.predicted)[:3]})
        uniform = []
        for c in pool.values():
            removed = r.sensitivities.removed[c.level]
            rec = candidate_recipe(c, r.units, [WEIGHT_OPTIONS[n] for n in r.options], r.kv_options, removed,
                                   kv_group=64, kv_residual="auto")
            p = heldout(rec, eval_ids, dtype)
            uniform.append({"recipe": c.label, "bytes": c.bytes, "heldout_perplexity": p,
                            "predicted_calibration_perplexity": r.perplexity(c, False)})
            print(f"  {pct:.0%} uniform {c.label:38s} {c.bytes / 2**20:7.2f} MiB  ppl {p:.3f}", flush=True)
        best = min(uniform, key=lambda u: u["heldout_perplexity"]) if uniform else None
        inc_auto = auto_ppl / base_ppl - 1
        inc_uni = best["heldout_perplexity"] / base_ppl - 1 if best else None
        rows.append({
            "budget_fraction": pct, "budget_bytes": budget, "auto_pick": r.describe(r.pick), "auto_bytes": r.pick.bytes,
            "auto_heldout_perplexity": auto_ppl, "auto_increase": inc_auto, "auto_bleu4": r.quality.get("bleu4"),
            "auto_attention_cosine": r.quality.get("attention_cosine"),
            "auto_verification_perplexity_measured": r.perplexity(r.pick), "verification_tokens": r.verify_tokens,
            "best_uniform": best, "best_uniform_increase": inc_uni,
            "increase_ratio_auto_over_uniform": (inc_auto / inc_uni) if inc_uni else None,
            "auto_not_worse": best is None or auto_ppl <= best["heldout_perplexity"],
            "uniform_evaluated": uniform, "uniform_fitting": len(fits), "uniform_enumerated": len(r.uniform),
            "shortlist": [{"kind": c.kind, "recipe": c.label or r.describe(c), "bytes": c.bytes,
                           "predicted_nll": c.predicted, "measured_nll": c.measured} for c in r.shortlist],
            "recipe": r.recipe, "seconds_auto": t_auto, "sensitivities_cached": r.sensitivities.cached,
            "sensitivity_seconds": r.sensitivities.seconds,
            "measured_memory": r.measured,
        })
        u = f"{best['heldout_perplexity']:.3f} ({100 * inc_uni:+.2f}%) {best['recipe']}" if best else "none fits"
        print(f"{pct:.0%}: auto {auto_ppl:.3f} ({100 * inc_auto:+.2f}%) [{r.describe(r.pick)}] | best uniform {u}", flush=True)
        write(args.out, rows, footprint, est, base_ppl, eval_ids, args, t0)
    print(f"\nbaseline held-out perplexity {base_ppl:.3f}; footprint {footprint / 2**20:.1f} MiB (weights + KV, bf16)")
    print(f"{'budget':>7} {'auto ppl':>10} {'auto +%':>8} {'uniform ppl':>12} {'unif +%':>8} {'ratio':>6}")
    for r_ in rows:
        b = r_["best_uniform"]
        print(f"{r_['budget_fraction']:>7.0%} {r_['auto_heldout_perplexity']:>10.3f} {100 * r_['auto_increase']:>8.2f} "
              f"{(b or {}).get('heldout_perplexity', math.nan):>12.3f} {100 * (r_['best_uniform_increase'] or math.nan):>8.2f} "
              f"{r_['increase_ratio_auto_over_uniform'] or math.nan:>6.2f}")


def write(path, rows, footprint, est, base_ppl, eval_ids, args, t0) -> None:
    last = rows[-1]
    out = {
        "benchmark": "auto_bench", "model": MODEL, "dtype": "bfloat16", "context": CONTEXT, "batch": BATCH,
        "budget_terms": list(TERMS), "footprint_bytes": footprint, "footprint_terms": {k: est.terms[k] for k in TERMS},
        "baseline_heldout_perplexity": base_ppl, "eval_tokens": int(eval_ids.numel()), "calib_tokens": args.calib_tokens,
        "rows": rows,
        "targets": {"auto_never_worse": all(r_["auto_not_worse"] for r_ in rows),
                    "at_25pct_increase_ratio": last["increase_ratio_auto_over_uniform"] if last["budget_fraction"] == 0.25 else None,
                    "at_25pct_target_met": (last["increase_ratio_auto_over_uniform"] or 9) <= 0.9 if last["budget_fraction"] == 0.25 else None},
        **environment("cpu"), "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
    }
    write_json(path, out, indent=2)


if __name__ == "__main__":
    main()
