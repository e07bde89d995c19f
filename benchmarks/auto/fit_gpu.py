"""Does the auto pick really fit? A 7B-shaped model's recipe for a budget, loaded and run on the GPU.

Two steps, so the GPU runs only what needs it:

1. ``--plan`` (CPU, no weights): a 7B-shaped Llama (hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads,
   vocab 32000, untied lm_head: Mistral-7B's shape) on the meta device; the recipe for ``--budget`` at
   ``--batch`` x ``--context`` is planned by :func:`openautoglm.auto.plan.plan` (the search of
   ``compress_to_budget``) with *synthetic* sensitivities -- random weights have no meaningful ones: the bundled
   model's measured per-layer sensitivities (attention, MLP, KV per width; ``benchmarks/.cache``, written by
   :mod:`benchmarks.auto.bench`), resampled from its 8 layers to 32 -- and written as a recipe JSON.
2. ``--run RECIPE`` (GPU): the model built with random bf16 weights on the GPU, the recipe applied
   (``apply_recipe``), then a prefill of ``batch`` x ``context - 1`` tokens through the recipe's KV cache and one
   decode step; peak ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (reset after loading) against
   the budget and the estimate. An out-of-memory error is a result (recorded), not a crash. The JSON goes to
   ``--out``, else ``$OUT/auto/fit_gpu.json``, else ``benchmarks/results/auto/fit_gpu.json``.

``--smoke`` plans and runs a small shape on the CPU (validation before spending GPU time; ~30 s).

    python -m benchmarks.auto.fit_gpu --plan --budget 14GiB --context 16384 --batch 4
    python -m benchmarks.auto.fit_gpu --run benchmarks/results/auto/fit_gpu_recipe.json --cap
    python -m benchmarks.auto.fit_gpu --smoke
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks._harness import ROOT, environment, git_commit, out_dir, write_json
SHAPE_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
                tie_word_embeddings=False, rms_norm_eps=1e-5)
SHAPE_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=16, vocab_size=8192, max_position_embeddings=4096,
                  tie_word_embeddings=False)


def config(tiny: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**(SHAPE_TINY if tiny else SHAPE_7B), dtype="bfloat16")


def _resample(rows: list[list[float]], n: int) -> list[list[float]]:
    """Per-layer rows of the bundled model, linearly interpolated to ``n`` layers."""
    import numpy as np

    a = np.array(rows, dtype=float)
    x = np.linspace(0, len(rows) - 1, n)
    return [[float(np.interp(xi, range(len(rows)), a[:, j])) for j in range(a.shape[1])] for xi in x]


def synthetic_sensitivities(units, options, kv_options, n_layers: int):
    """The bundled model's sensitivities (latest cache entry with these options) as the search uses them (shrunk,
    clamped, monotone: ``denoised``), resampled to ``n_layers``."""
    from openautoglm.auto.sensitivity import Sensitivities, cache_dir

    names = [o.name for o in options]
    src = None
    for p in sorted(cache_dir(ROOT / "benchmarks" / ".cache").glob("*.json"), key=lambda p: p.stat().st_mtime):
        s = Sensitivities.from_json(p.read_text())
        if s.options == names and s.kv_options == list(kv_options):
            src = s
    if src is None:
        print("no bundled-model sensitivities in benchmarks/.cache (run python -m benchmarks.auto.bench): using a formula")
        return formula_sensitivities(units, names, kv_options, n_layers)
    src = src.denoised()
    attn = _resample([r for u, r in zip(src.units, src.weight) if u.endswith(".attn")], n_layers)
    mlp = _resample([r for u, r in zip(src.units, src.weight) if u.endswith(".mlp")], n_layers)
    kv = _resample(src.kv, n_layers)
    # a 7B has 4x the layers, each a smaller share of the model: scale so the whole-model cost of a uniform
    # choice equals the bundled model's (per-layer costs / (n_layers / 8))
    f = len(src.kv) / n_layers
    weight = [[v * f for v in (attn if u.kind == "attn" else mlp)[u.layer]] if u.layer >= 0 else
              [0.0] + [2 * max(r[i] for r in mlp) for i in range(1, len(names))] for u in units]
    what = f"the bundled model's measured per-layer profile (denoised) resampled to {n_layers} layers"
    return Sensitivities([u.name for u in units], names, list(kv_options), [0.0], src.base_nll, weight,
                         [[v * f for v in row] for row in kv], [0.0], [{}], {"synthetic": what, "from": src.calibration})


def formula_sensitivities(units, names, kv_options, n_layers: int):
    """A stand-in profile (validation only): costs grow as bits shrink, edge layers 3x more sensitive."""
    import math

    from openautoglm.auto.sensitivity import Sensitivities

    per = {"bf16": 0.0, "w8": 1e-4, "w8a8": 2e-4, "w4g32": 2e-3, "w4g64": 2.5e-3, "w4g128": 3e-3}
    kvc = {None: 0.0, 8: 1e-5, 4: 5e-4, 2: 1e-2}
    edge = [1 + 2 * math.exp(-i) + 2 * math.exp(-(n_layers - 1 - i)) for i in range(n_layers)]
    weight = [[per[n] * (edge[u.layer] if u.layer >= 0 else 4) * 8 / n_layers for n in names] for u in units]
    kv = [[kvc[b] * edge[i] * 8 / n_layers for b in kv_options] for i in range(n_layers)]
    return Sensitivities([u.name for u in units], list(names), list(kv_options), [0.0], 2.8, weight, kv, [0.0], [{}],
                         {"synthetic": "formula (no measured profile in benchmarks/.cache)"})


def do_plan(args) -> Path:
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from openautoglm.auto.api import DEFAULT_SCHEMES, candidate_recipe
    from openautoglm.auto.budget import parse_budget
    from openautoglm.auto.plan import plan
    from openautoglm.auto.recipe import save_recipe
    from openautoglm.auto.space import BUDGET_TERMS, KV_OPTIONS, WEIGHT_OPTIONS, find_units
    from openautoglm.memory import estimate_memory

    with init_empty_weights():
        meta = LlamaForCausalLM._from_config(config(args.tiny), dtype=torch.bfloat16)
    units = find_units(meta)
    options = [WEIGHT_OPTIONS[n] for n in DEFAULT_SCHEMES]
    sens = synthetic_sensitivities(units, options, list(KV_OPTIONS), meta.config.num_hidden_layers)
    budget = parse_budget(args.budget)
    device = args.device or ("cpu" if args.tiny else "cuda")
    p = plan(meta, sens.denoised(), units, options, list(KV_OPTIONS), budget, context=args.context, batch=args.batch,
             terms=BUDGET_TERMS, headroom=args.headroom, device=device, kv_group=64, kv_residual="auto")
    pick = min(p.auto, key=lambda c: c.predicted)
    target = {"budget": budget, "context": args.context, "batch": args.batch, "budget_terms": list(BUDGET_TERMS),
              "headroom": args.headroom, "device": device, "shape": SHAPE_TINY if args.tiny else SHAPE_7B,
              "sensitivities": sens.calibration}
    rec = candidate_recipe(pick, units, options, list(KV_OPTIONS), {}, kv_group=64, kv_residual="auto", **target)
    kvb = [KV_OPTIONS[b] for b in pick.kv]
    est = estimate_memory(meta, quantization=[st["config"] for st in rec["steps"] if st["type"] == "quantize"] or None,
                          kv_dtype=kvb, batch=args.batch, seq_len=args.context, device=device)
    bf16 = estimate_memory(meta, batch=args.batch, seq_len=args.context, device=device)
    rec["estimate"] = {"terms": est.terms, "total": est.total, "tables_total": pick.bytes,
                       "uncompressed_total": bf16.total, "uncompressed_terms": bf16.terms}
    rec["summary"] = {"weights": Counter(options[o].name for o in pick.weights),
                      "kv": Counter("bf16" if b is None else f"int{b}" for b in kvb)}
    rec["planned_at"] = {"commit": git_commit()[0], "smallest_bytes": p.smallest.bytes, "fit": p.fit}
    default = out_dir("auto", args.tiny) / ("fit_tiny_recipe.json" if args.tiny else "fit_gpu_recipe.json")
    out = save_recipe(rec, Path(args.recipe_out or default))
    g = 2**30
    print(f"planned for {budget / g:.2f} GiB ({device}): {dict(rec['summary']['weights'])}, KV "
          f"{dict(rec['summary']['kv'])}; estimate {est.total / g:.3f} GiB "
          f"{ {k: round(v / g, 3) for k, v in est.terms.items()} } (uncompressed {bf16.total / g:.2f} GiB) -> {out}")
    return out


def _build(tiny: bool, dev: torch.device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        return LlamaForCausalLM._from_config(config(tiny), dtype=torch.bfloat16).eval()


def do_run(args, recipe: Path) -> dict:
    from openautoglm.auto.quality import measure_memory
    from openautoglm.auto.recipe import apply_recipe, load_recipe
    from openautoglm.memory import estimate_memory, model_bytes

    rec = load_recipe(recipe)
    tgt = rec["target"]
    tiny = tgt["shape"] == SHAPE_TINY
    dev = torch.device(tgt["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{recipe} was planned for CUDA and no GPU is here (use --smoke to validate on the CPU)")
    t0 = time.perf_counter()
    model = _build(tiny, dev)
    t_build = time.perf_counter() - t0
    kv = apply_recipe(model, rec)
    t_apply = time.perf_counter() - t0 - t_build
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if args.cap:  # from here on the allocator may hold no more than the budget: a GPU of exactly that size
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(tgt["budget"] / total, torch.cuda.current_device() if dev.index is None else dev.index)
    kvb = list(kv.bits) if kv is not None and isinstance(kv.bits, tuple) else None
    est = estimate_memory(model, batch=tgt["batch"], seq_len=tgt["context"], kv_dtype=kvb, device=dev.type)
    print(f"built {t_build:.1f} s, recipe applied {t_apply:.1f} s, weights {model_bytes(model) / 2**30:.3f} GiB; "
          f"estimate {est.total / 2**30:.3f} GiB", flush=True)
    t1 = time.perf_counter()
    oom = None
    try:
        m = measure_memory(model, kv, batch=tgt["batch"], context=tgt["context"], decode_steps=1)
    except torch.OutOfMemoryError as e:  # a result: the pick did not fit
        oom = str(e).splitlines()[0]
        m = {"peak": int(torch.cuda.max_memory_allocated(dev)), "reserved_peak": int(torch.cuda.max_memory_reserved(dev)),
             "weights": model_bytes(model), "kv_cache": None, "device": str(dev)}
    if dev.type == "cuda":
        torch.cuda.synchronize()
    reserved = m.get("reserved_peak", m["peak"])
    out = {
        "benchmark": "auto_fit_gpu", "shape": tgt.get("shape"), "budget": tgt["budget"], "batch": tgt["batch"],
        "context": tgt["context"], "headroom": tgt.get("headroom"), "recipe_summary": rec.get("summary"),
        "sensitivities": tgt.get("sensitivities"), "planned": rec.get("estimate"),
        "estimate": {"total": est.total, "terms": est.terms}, "measured": m, "out_of_memory": oom,
        "peak_allocated_within_budget": oom is None and m["peak"] <= tgt["budget"],
        "peak_reserved_within_budget": oom is None and reserved <= tgt["budget"],
        "peak_over_estimate": m["peak"] / est.total, "peak_over_budget": m["peak"] / tgt["budget"],
        "seconds": {"build": t_build, "apply": t_apply, "prefill_decode": time.perf_counter() - t1},
        **environment(dev), "kv_compile": os.environ.get("OPENAUTOGLM_KV_COMPILE"),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "memory_cap": tgt["budget"] if args.cap and dev.type == "cuda" else None,
        "planned_at_commit": (rec.get("planned_at") or {}).get("commit"),
    }
    name = "fit_tiny.json" if tiny else "fit_gpu.json"
    path = write_json(Path(args.out) if args.out else out_dir("auto", tiny) / name, out, indent=2)
    from openautoglm.auto.budget import fmt_bytes

    rows = [("budget", tgt["budget"]), ("estimate", est.total), ("peak allocated", m["peak"]),
            ("peak reserved", reserved), ("weights", m["weights"]), ("KV cache", m["kv_cache"])]
    print("\n" + "\n".join(f"{k:16s} {'' if v is None else fmt_bytes(v):>12s}" for k, v in rows))
    print(f"fits: {out['peak_allocated_within_budget']} (reserved: {out['peak_reserved_within_budget']})"
          f"{' OOM: ' + oom if oom else ''} -> {path}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", action="store_true", help="plan the recipe (CPU, meta device) and write it")
    ap.add_argument("--run", default=None, help="recipe JSON to load and run (on the device it was planned for)")
    ap.add_argument("--smoke", action="store_true", help="plan and run a small shape on the CPU (validation)")
    ap.add_argument("--budget", default="14GiB")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--headroom", type=float, default=0.03)
    ap.add_argument("--tiny", action="store_true", help="--plan: the small shape (planned for the CPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="--plan: where it will run")
    ap.add_argument("--recipe-out", default=None, help="--plan: where the recipe goes")
    ap.add_argument("--out", default=None, help="--run: where the JSON goes (default: fit_gpu.json in $OUT/auto, else in "
                    "benchmarks/results/auto)")
    ap.add_argument("--cap", action="store_true", help="--run on CUDA: after loading, cap the caching allocator at the "
                    "budget (torch.cuda.set_per_process_memory_fraction), as on a GPU of that size")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.device, args.budget, args.context, args.batch = True, "cpu", "12MiB", 256, 2
        with tempfile.TemporaryDirectory() as d:
            args.recipe_out = args.recipe_out or str(Path(d) / "recipe.json")
            res = do_run(args, do_plan(args))
        if not res["peak_allocated_within_budget"]:
            raise SystemExit("smoke: the small shape's pick did not fit its budget on the CPU")
        return
    if not (args.plan or args.run):
        ap.error("give --plan, --run RECIPE or --smoke")
    if args.plan:
        do_plan(args)
    if args.run:
        do_run(args, Path(args.run))


if __name__ == "__main__":
    main()
