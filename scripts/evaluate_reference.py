"""Measure the bundled model against its bar and record it in benchmarks/results/model/reference.json.

Bar (issue 3): held-out perplexity below one third of a unigram model's perplexity on the same tokenizer,
and greedy generations that read like documentation text. The unigram model is fitted (add-one smoothed)
on the training split's token counts, rebuilt here from the same Debian packages if ``data/corpus/train.bin``
is missing (run ``scripts/build_corpus.py`` first).

Usage: ``python scripts/evaluate_reference.py [--seq-len 2048]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from openautoglm import AutoModelForCausalLM, AutoTokenizer
from openautoglm.evaluate import greedy_generate, heldout_prompts, heldout_token_ids, perplexity

REPO = Path(__file__).resolve().parents[1]


def unigram_perplexity(train_ids: np.ndarray, held_ids: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[held_ids].mean()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "model" / "reference.json")
    args = ap.parse_args()
    train_bin = REPO / "data" / "corpus" / "train.bin"
    if not train_bin.exists():
        raise SystemExit("data/corpus/train.bin missing: run python scripts/build_corpus.py first")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained("open-autoglm-base", dtype="fp32")
    tok = AutoTokenizer.from_pretrained("open-autoglm-base")
    held = heldout_token_ids(tok)
    res = perplexity(model, token_ids=held, seq_len=args.seq_len, batch_size=2)
    uni = unigram_perplexity(np.fromfile(train_bin, dtype=np.uint16), held.numpy(), model.config.vocab_size)
    prompts = heldout_prompts(tok, n=4, prompt_tokens=24)
    gens = greedy_generate(model, tok, prompts, max_new_tokens=64)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    out = {
        "model": "open-autoglm-base",
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_tokens_scored": res.tokens,
        "window": args.seq_len,
        "heldout_perplexity": round(res.perplexity, 3),
        "unigram_perplexity": round(uni, 3),
        "bar_one_third_of_unigram": round(uni / 3, 3),
        "meets_bar": res.perplexity < uni / 3,
        "greedy_samples": [{"prompt": p, "continuation": g} for p, g in zip(prompts, gens)],
        "device": "cpu", "dtype": "float32 (weights stored bf16)",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "python": platform.python_version(), "commit": commit, "date": datetime.date.today().isoformat(),
    }
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "greedy_samples"}, indent=2))


if __name__ == "__main__":
    main()
