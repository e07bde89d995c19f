"""Pruning on the bundled model (CPU): head pruning (+ recovery), sparsity, low-rank; quality and memory.

    python -m benchmarks.prune.bench [--sections heads,importance,sparsity,lowrank] [--eval-tokens 16384]

Quality: perplexity on the first ``--eval-tokens`` tokens of the bundled held-out text (windows of 512) and
BLEU-4 of greedy generations (8 held-out prompts, 48 new tokens) against the unpruned model's. Calibration
windows and the recovery fine-tune come from the *training* split (data/corpus/train.bin, built by
scripts/build_corpus.py; else the held-out text's second half, which perplexity does not read). Bytes are
given at bf16 (the checkpoint's dtype); the model runs in fp32 on the CPU. Sections merge into
``--out`` (default benchmarks/results/prune/bench.json); the plot is bench.png next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._harness import ROOT, environment, out_dir, write_json
from openautoglm import hub
from openautoglm.evaluate import bleu_vs_baseline, greedy_generate, heldout_prompts, heldout_token_ids, perplexity
from openautoglm.prune import HeadPruner, calibration_ids, low_rank, recover, sparsify

BF16 = 2
CONTEXT = 2048  # tokens of KV cache counted in "attention memory" (the model's trained context)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tok = hub.load_tokenizer("open-autoglm-base")
        self.base = hub.from_pretrained("open-autoglm-base", dtype=torch.float32)
        self.eval_ids = heldout_token_ids(self.tok)[: args.eval_tokens]
        train_bin = ROOT / "data" / "corpus" / "train.bin"
        if train_bin.is_file():
            self.train_ids = torch.from_numpy(np.fromfile(train_bin, dtype=np.uint16)[:4_000_000].astype(np.int64))
            self.data_source = "data/corpus/train.bin (training split)"
        else:
            self.train_ids = heldout_token_ids(self.tok)[len(heldout_token_ids(self.tok)) // 2:]
            self.data_source = "held-out text, second half (no training split found)"
        self.calib = calibration_ids(token_ids=self.train_ids, n_samples=args.calib_samples, seq_len=256, seed=0)
        self.prompts = heldout_prompts(self.tok, n=8, prompt_tokens=32)
        self.refs = greedy_generate(self.base, self.tok, self.prompts, max_new_tokens=48)

    def ppl(self, model) -> float:
        return round(perplexity(model, token_ids=self.eval_ids, seq_len=512, batch_size=4, progress=False).perplexity, 3)

    def bleu(self, model) -> float:
        return round(bleu_vs_baseline(greedy_generate(model, self.tok, self.prompts, max_new_tokens=48), self.refs), 2)

    def fresh(self):
        return copy.deepcopy(self.base)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def section_baseline(b: Bench) -> dict:
    return {"perplexity": b.ppl(b.base), "params": params(b.base), "weight_bytes_bf16": params(b.base) * BF16}


def section_heads(b: Bench) -> dict:
    out = {}
    for gran in ("head", "kv_group"):
        model = b.fresh()
        t = time.perf_counter()
        res = HeadPruner(importance="taylor", ratio=0.25, scope="global", granularity=gran, batch_size=1).prune(
            model, calib_ids=b.calib[: b.args.head_samples])
        prune_s = time.perf_counter() - t
        scale = BF16 / 4  # fp32 on the CPU here -> bf16 bytes
        a0, a1 = (x * scale for x in res.attention_bytes(CONTEXT))
        row = {"granularity": gran, "importance": "taylor", "scope": "global", "ratio": 0.25,
               "query_heads": [sum(q for q, _ in res.heads_before), sum(q for q, _ in res.heads_after)],
               "kv_heads": [sum(k for _, k in res.heads_before), sum(k for _, k in res.heads_after)],
               "heads_per_layer_after": res.heads_after, "prune_seconds": round(prune_s, 1),
               "params_saved": res.params_before - res.params_after,
               "attn_weight_bytes_bf16": [res.attn_weight_bytes_before * scale, res.attn_weight_bytes_after * scale],
               "kv_bytes_per_token_bf16": [res.kv_bytes_per_token_before * scale, res.kv_bytes_per_token_after * scale],
               f"attention_memory_bytes_bf16_at_{CONTEXT}_tokens": [a0, a1],
               "attention_weights_saved_frac": round(1 - res.attn_weight_bytes_after / res.attn_weight_bytes_before, 4),
               "kv_cache_saved_frac": round(1 - res.kv_bytes_per_token_after / res.kv_bytes_per_token_before, 4),
               f"attention_memory_saved_frac_at_{CONTEXT}": round(1 - a1 / a0, 4),
               "perplexity_before_recovery": b.ppl(model), "bleu4_before_recovery": b.bleu(model)}
        print(gran, row, flush=True)
        rec = recover(model, b.train_ids, steps=b.args.recovery_steps, batch_size=4, seq_len=256, lr=3e-4, warmup=5)
        row.update({"recovery": {"steps": b.args.recovery_steps, "batch": 4, "seq_len": 256, "lr": 3e-4,
                                 "trainer": rec.trainer, "seconds": round(rec.seconds, 1),
                                 "loss_first": round(rec.losses[0], 4), "loss_last": round(rec.losses[-1], 4)},
                    "perplexity_after_recovery": b.ppl(model), "bleu4_after_recovery": b.bleu(model)})
        print(gran, "after recovery", row["perplexity_after_recovery"], row["bleu4_after_recovery"], flush=True)
        out[gran] = row
    return out


def section_importance(b: Bench) -> dict:
    out = {}
    for imp in ("magnitude", "wanda", "taylor", "fisher"):
        model = b.fresh()
        HeadPruner(importance=imp, ratio=0.25, scope="global", batch_size=1).prune(
            model, calib_ids=b.calib[: b.args.head_samples])
        out[imp] = {"perplexity": b.ppl(model)}
        print("importance", imp, out[imp], flush=True)
    return out


def bf16_storage(model, pattern: str) -> dict:
    """Storage of the sparsified targets as bf16 (dense / CSR / bitmask / 2:4), summed over modules."""
    from openautoglm.prune.sparsity import DEFAULT_TARGETS, sparse_storage_bytes, target_linears

    out: dict[str, int] = {}
    for m in target_linears(model, list(DEFAULT_TARGETS)).values():
        for k, v in sparse_storage_bytes(m.weight.detach().to(torch.bfloat16), pattern).items():
            out[k] = out.get(k, 0) + v
    return out


def section_sparsity(b: Bench) -> dict:
    out = {}
    runs = [("unstructured", "magnitude", "per_layer"), ("unstructured", "magnitude", "per_output"),
            ("unstructured", "wanda", "per_output"), ("2:4", "magnitude", "per_output"), ("2:4", "wanda", "per_output")]
    for pattern, method, scope in runs:
        model = b.fresh()
        res = sparsify(model, sparsity=0.5, method=method, pattern=pattern, scope=scope, calib_ids=b.calib)
        key = f"{pattern}/{method}/{scope}"
        st = bf16_storage(model, pattern)
        out[key] = {"sparsity": round(res.params_pruned / res.params_targeted, 4), "perplexity": b.ppl(model),
                    "target_bytes_bf16": st}
        print("sparsity", key, out[key], flush=True)
    return out


def section_lowrank(b: Bench) -> dict:
    out = {"points": []}
    p0 = params(b.base)
    for method in ("activation", "plain"):
        for ratio in b.args.lowrank_ratios:
            model = b.fresh()
            res = low_rank(model, param_ratio=ratio, method=method, calib_ids=b.calib, rank_multiple=8)
            pt = {"method": method, "param_ratio_per_module": ratio, "modules": len(res.ranks),
                  "params": params(model), "param_reduction_frac": round(1 - params(model) / p0, 4),
                  "perplexity": b.ppl(model)}
            out["points"].append(pt)
            print("lowrank", pt, flush=True)
    model = b.fresh()
    res = low_rank(model, energy=0.9, method="activation", calib_ids=b.calib, rank_multiple=8)
    out["energy_0.9_activation"] = {"modules": len(res.ranks), "skipped": len(res.skipped),
                                    "param_reduction_frac": round(1 - params(model) / p0, 4),
                                    "perplexity": b.ppl(model)}
    print("lowrank energy 0.9", out["energy_0.9_activation"], flush=True)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    base = res.get("baseline", {}).get("perplexity")
    if "heads" in res:
        labels, before, after = [], [], []
        for g, r in res["heads"].items():
            labels.append(f"{g}\n-{r[f'attention_memory_saved_frac_at_{CONTEXT}'] * 100:.0f}% attn mem")
            before.append(r["perplexity_before_recovery"])
            after.append(r["perplexity_after_recovery"])
        x = np.arange(len(labels))
        ax[0].bar(x - 0.2, before, 0.4, label="pruned")
        ax[0].bar(x + 0.2, after, 0.4, label="after recovery")
        ax[0].set_xticks(x, labels)
        ax[0].set_title("25% heads removed (Taylor, global)")
    if "sparsity" in res:
        ks = list(res["sparsity"])
        ax[1].bar(range(len(ks)), [res["sparsity"][k]["perplexity"] for k in ks], color="tab:orange")
        ax[1].set_xticks(range(len(ks)), [k.replace("/", "\n") for k in ks], fontsize=7)
        ax[1].set_yscale("log")
        ax[1].set_title("50% sparsity")
    if "lowrank" in res:
        for m in ("activation", "plain"):
            pts = [p for p in res["lowrank"]["points"] if p["method"] == m]
            ax[2].plot([p["param_reduction_frac"] * 100 for p in pts], [p["perplexity"] for p in pts], "o-", label=m)
        ax[2].set_yscale("log")
        ax[2].set_xlabel("parameters removed (%)")
        ax[2].set_title("low-rank: activation-aware vs plain SVD")
    for a in ax:
        if base:
            a.axhline(base, color="gray", ls="--", label="unpruned")
        a.set_ylabel("held-out perplexity")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="baseline,heads,importance,sparsity,lowrank")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--head-samples", type=int, default=32)
    ap.add_argument("--recovery-steps", type=int, default=50)
    ap.add_argument("--lowrank-ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 0.75, 0.6])
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default: bench.json in $OUT/prune, else in "
                    "benchmarks/results/prune)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    out = args.out or out_dir("prune") / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.is_file() else {}
    if not args.plot_only:
        b = Bench(args)
        res.update({"benchmark": "prune_bench", **environment("cpu"), "threads": torch.get_num_threads(),
                    "model": "open-autoglm-base (fp32 on CPU)", "eval_tokens": args.eval_tokens,
                    "calibration": f"{args.calib_samples} x 256 tokens from {b.data_source}",
                    "bleu": "BLEU-4 vs the unpruned model's greedy generations, 8 held-out prompts x 48 tokens"})
        for sec in args.sections.split(","):
            t = time.perf_counter()
            res[sec] = globals()[f"section_{sec}"](b)
            res.setdefault("section_seconds", {})[sec] = round(time.perf_counter() - t, 1)
            write_json(out, res, indent=2)
    plot(res, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in res.items() if k in ("baseline",)}, indent=1))


if __name__ == "__main__":
    main()
