"""Overhead of the tensor-parallel path at tp_size=1 against the plain model, in one run on one GPU.

Variants, all holding the same random weights of a Llama shape, timed interleaved (round-robin) in one process:

* ``plain``  -- the model as loaded;
* ``tp1``    -- ``openautoglm.parallel.shard(model, tp_size=1)``: what a user gets with one rank;
* ``tp1+comm`` -- the same with the collectives wired anyway on a one-rank process group (NCCL on the GPU):
  the all-reduce after every row-parallel layer is called (2 per decoder layer), which prices the call
  itself, without bandwidth, for the multi-GPU runs.

Prefill: ``batch x prompt`` tokens, one forward, last-position logits. Decode: an eager greedy loop over a
DynamicCache after a short prefill (no CUDA graphs: launch overhead is where extra Python hooks would show).
CUDA events (:func:`benchmarks._harness.event_ms`), a warm-up round, medians. Prints a table and writes
overhead_gpu.json to ``--out`` (default ``$OUT/parallel``, else ``benchmarks/results/parallel``; a temporary folder for
``--shape tiny``).

    python -m benchmarks.parallel.overhead_gpu                            # 1B-shaped bf16 on the GPU
    python -m benchmarks.parallel.overhead_gpu --shape tiny --device cpu  # CPU check
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks._harness import environment, event_ms, out_dir, write_json

SHAPES = {  # Llama shapes (random weights)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)  # real inv_freq after to_empty
    return model.eval()


@torch.no_grad()
def prefill(model, ids):
    return model(ids, use_cache=False, logits_to_keep=1).logits


@torch.no_grad()
def decode(model, ids, steps: int):
    from transformers import DynamicCache

    from openautoglm import _hf

    cache = DynamicCache(config=model.config)
    out = _hf.forward_with_cache(model, ids, cache)
    tok = out.logits[:, -1:].argmax(-1)
    toks = []
    for _ in range(steps):
        out = _hf.forward_with_cache(model, tok, cache)
        tok = out.logits[:, -1:].argmax(-1)
        toks.append(tok)
    return torch.cat(toks, 1)


def one_rank_group(device: str):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    return dist.group.WORLD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=2048, help="prefill tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="the JSON (default: overhead_gpu.json in $OUT/parallel, else in "
                    "benchmarks/results/parallel)")
    args = ap.parse_args()
    from openautoglm import parallel
    from openautoglm.memory.estimate import model_bytes

    t0 = time.time()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    plain = build(args.shape, args.device, dtype)
    tp1 = parallel.shard(copy.deepcopy(plain), tp_size=1)
    comm = copy.deepcopy(plain)
    group = one_rank_group(args.device)
    plan = parallel.make_plan(comm, 1)
    parallel.apply_plan(comm, plan)
    parallel.install(comm, plan, group, force=True)
    variants = {"plain": plain, "tp1": tp1, "tp1+comm": comm}
    hooks = sum(len(m._forward_hooks) for m in comm.modules())
    g = torch.Generator().manual_seed(1)
    vocab = plain.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=g).to(args.device)
    short = ids[:, :128]
    cuda = args.device.startswith("cuda")

    def timer(fn) -> float:  # milliseconds of one call
        return event_ms(fn, reps=1, warmup=0, cuda=cuda)

    ref_logits, ref_tokens = prefill(plain, ids), decode(plain, short, 8)
    check = {n: {"prefill_logits_max_abs_diff": (prefill(m, ids) - ref_logits).abs().max().item(),
                 "decode_tokens_equal": bool(torch.equal(decode(m, short, 8), ref_tokens))} for n, m in variants.items()}
    times = {n: {"prefill_ms": [], "decode_ms": []} for n in variants}
    for rep in range(args.reps + 1):  # the first round is warm-up
        for name, m in variants.items():
            p = timer(lambda: prefill(m, ids))
            d = timer(lambda: decode(m, short, args.decode_steps))
            if rep:
                times[name]["prefill_ms"].append(p)
                times[name]["decode_ms"].append(d)
    rows = {}
    for name, t in times.items():
        pm, dm = statistics.median(t["prefill_ms"]), statistics.median(t["decode_ms"])
        rows[name] = {"prefill_ms": pm, "decode_ms": dm, "decode_tok_s": args.batch * (args.decode_steps + 1) / dm * 1e3,
                      "weight_bytes": model_bytes(variants[name]), **check[name],
                      "prefill_runs_ms": t["prefill_ms"], "decode_runs_ms": t["decode_ms"]}
    base = rows["plain"]
    for r in rows.values():
        r["prefill_vs_plain"] = r["prefill_ms"] / base["prefill_ms"]
        r["decode_tok_s_vs_plain"] = r["decode_tok_s"] / base["decode_tok_s"]
    n_layers = plain.config.num_hidden_layers
    per_call_us = (rows["tp1+comm"]["decode_ms"] - base["decode_ms"]) / (args.decode_steps + 1) / (2 * n_layers) * 1e3
    result = {**environment(args.device), "shape": args.shape, "config": SHAPES[args.shape], "dtype": str(dtype), "batch": args.batch,
              "prompt": args.prompt, "decode_steps": args.decode_steps, "reps": args.reps, "comm_hooks": hooks,
              "all_reduce_call_us_estimate": per_call_us, "variants": rows, "wall_s": time.time() - t0}
    out = write_json(Path(args.out) if args.out else out_dir("parallel", args.shape == "tiny") / "overhead_gpu.json",
                     result, indent=2)
    print(f"{result['device']}  torch {result['torch']}  transformers {result['transformers']}  {args.shape} {dtype}")
    print(f"{'variant':10} {'prefill ms':>10} {'x plain':>8} {'decode tok/s':>12} {'x plain':>8} {'logits diff':>11} tokens")
    for name, r in rows.items():
        print(f"{name:10} {r['prefill_ms']:10.2f} {r['prefill_vs_plain']:8.3f} {r['decode_tok_s']:12.1f} "
              f"{r['decode_tok_s_vs_plain']:8.3f} {r['prefill_logits_max_abs_diff']:11.2e} {r['decode_tokens_equal']}")
    print(f"one-rank all-reduce call: ~{per_call_us:.1f} us ({hooks} hooks); wrote {out}")
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
