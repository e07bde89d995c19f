"""Train the bundled reference model ``open-autoglm-base`` (run on the lent GPU).

A LlamaForCausalLM with grouped-query attention (16 query heads, 4 KV heads per layer), trained at a
context of 2048 tokens on the corpus built by ``scripts/build_corpus.py`` through the project's training
loop :func:`openautoglm.training.loop.train`: bf16 autocast, AdamW with decoupled weight decay, linear warm-up then
cosine decay, gradient accumulation and optional activation checkpointing.

The shipped checkpoint was produced by this script's first version (git 38e6e89: a hand-written loop with
the same model, data and hyper-parameters, 2000 steps, 259 s on one H100); this version has run on CPU only. Writes bf16 safetensors shards (<= 15 MB each), the config, and a JSON training log with
held-out perplexity and greedy samples.

Usage (from the repository root, on the GPU machine)::

    python scripts/train_reference.py --out $OUT --steps 2000 --micro-batch 16 --grad-accum 2
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

MODEL_CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=768,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)


def build_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **MODEL_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def heldout_ppl(model, ids: torch.Tensor, seq: int, device, max_windows: int | None = None) -> float:
    model.eval()
    n = (ids.numel() - 1) // seq
    if max_windows:
        n = min(n, max_windows)
    nll, count = 0.0, 0
    for i in range(0, n, 8):
        rows = range(i, min(n, i + 8))
        x = torch.stack([ids[r * seq : r * seq + seq] for r in rows]).to(device)
        y = torch.stack([ids[r * seq + 1 : r * seq + seq + 1] for r in rows]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO / "data" / "corpus")
    ap.add_argument("--tokenizer", type=Path, default=REPO / "data" / "tokenizer")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from openautoglm.training.loop import TrainConfig, train

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    train_ids = torch.from_numpy(np.fromfile(args.data / "train.bin", dtype=np.uint16).astype(np.int64))
    held = torch.from_numpy(np.fromfile(args.data / "heldout.bin", dtype=np.uint16).astype(np.int64))
    model = build_model(tok).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(
        steps=args.steps, warmup_steps=args.warmup, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
        seq_len=args.seq, lr=args.lr, min_lr_ratio=args.min_lr / args.lr, weight_decay=args.weight_decay,
        betas=(0.9, 0.95), grad_clip=1.0, optimizer="adamw_fused", amp="bf16" if device.type == "cuda" else "none",
        grad_checkpointing=args.grad_checkpointing, eval_every=250, eval_batches=8, log_every=50, seed=args.seed,
    )
    import transformers

    log = {"config": MODEL_CONFIG, "params": n_params, "args": {k: str(v) for k, v in vars(args).items()},
           "train_config": cfg.to_dict(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"params {n_params/1e6:.2f} M, train tokens {train_ids.numel()/1e6:.2f} M, held-out {held.numel()}")
    res = train(model, train_ids, cfg, eval_data=held[: 16 * args.seq + 1])
    log["history"] = {"losses": res.losses, "evals": res.evals}
    log["train_seconds"] = round(res.elapsed_s, 1)
    log["tokens_seen"] = res.tokens
    log["tok_per_s"] = round(res.tokens_per_s)
    log["epochs"] = round(res.tokens / train_ids.numel(), 2)
    log["heldout_ppl"] = heldout_ppl(model, held, args.seq, device)
    print("held-out perplexity", log["heldout_ppl"])

    model.eval()
    samples = {}
    for prompt in ["The :mod:`json` module", "Functions\n=========\n\n", "To create a virtual environment,"]:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            out = model.generate(ids, max_new_tokens=80, do_sample=False)
        samples[prompt] = tok.decode(out[0], skip_special_tokens=True)
    log["samples"] = samples
    for k, v in samples.items():
        print("----", repr(k), "\n", v)
    model = model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(args.out, max_shard_size="15MB")
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
