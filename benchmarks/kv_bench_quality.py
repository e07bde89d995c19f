"""CPU part of the KV-cache benchmark: the bundled model on its held-out text.

Perplexity with each cache (2048-token windows fed in 64-token chunks, so every chunk reads the
compressed cache), attention-probability cosine vs the full-precision cache, BLEU-4 of 128-token
greedy generations vs the full-precision model, and KV bytes at 2048 context (bf16 model, measured
as the storages each cache holds).
"""

from __future__ import annotations

import time

import torch

from openautoglm import _hf, hub
from openautoglm.evaluate import heldout_prompts, heldout_token_ids, perplexity
from openautoglm.kv import KVCacheConfig
from openautoglm.kv.metrics import attention_fidelity, cached_perplexity, greedy_with_cache
from openautoglm.evaluate import bleu_vs_baseline

CONFIGS = {
    "int8": KVCacheConfig(bits=8),
    "int4": KVCacheConfig(bits=4),
    "int2": KVCacheConfig(bits=2),
    "int4-g32-r64": KVCacheConfig(bits=4, group_size=32, residual_length=64),
    "share-s4-t0.9": KVCacheConfig(share=True, share_start=4, share_threshold=0.9),
    "share-s4-all": KVCacheConfig(share=True, share_start=4, share_threshold=-1.0),
    "share-s0-all": KVCacheConfig(share=True, share_start=0, share_threshold=-1.0),
    "int4+share-s4-all": KVCacheConfig(bits=4, share=True, share_start=4, share_threshold=-1.0),
    "int4+share-s0-all": KVCacheConfig(bits=4, share=True, share_start=0, share_threshold=-1.0),
}


@torch.no_grad()
def kv_bytes(model, ids: torch.Tensor, kv: KVCacheConfig) -> dict:
    cache = kv.build(model.config)
    _hf.forward_with_cache(model, ids, cache, logits_to_keep=1)
    if hasattr(cache, "nbytes"):
        b = cache.nbytes()
    else:
        b = sum(l.keys.untyped_storage().nbytes() + l.values.untyped_storage().nbytes() for l in cache.layers)
    rep = cache.report() if hasattr(cache, "report") else None
    return {"bytes": b, "sharing": rep}


def run(args, env, write_json, print_table) -> dict:
    t0 = time.time()
    name = "open-autoglm-base"
    tok = hub.load_tokenizer(name)
    ids = heldout_token_ids(tok)
    res = {"environment": env, "model": name, "configs": {k: v.to_dict() for k, v in CONFIGS.items()},
           "settings": {"seq_len": 2048, "chunk": 64, "max_tokens": args.max_tokens, "attention_context": 1024,
                        "attention_probe": 32, "attention_windows": 2, "bleu_prompts": args.prompts,
                        "bleu_prompt_tokens": 384, "bleu_new_tokens": 128}}

    def save():
        res["elapsed_s"] = time.time() - t0
        write_json(__import__("pathlib").Path(args.out), res)

    # bytes at 2048 context with the model in bf16 (the dtype it ships in)
    mb = hub.from_pretrained(name, dtype="bf16", device="cpu")
    x = ids[:2048].view(1, -1)
    res["kv_bytes_2048"] = {"bf16": kv_bytes(mb, x, KVCacheConfig())}
    for k, kv in CONFIGS.items():
        res["kv_bytes_2048"][k] = kv_bytes(mb, x, kv)
        res["kv_bytes_2048"][k]["vs_bf16"] = res["kv_bytes_2048"][k]["bytes"] / res["kv_bytes_2048"]["bf16"]["bytes"]
    del mb
    save()

    model = hub.from_pretrained(name, dtype="fp32", device="cpu")  # quality in fp32 (bf16 matmuls are slow on CPU)
    pk = dict(token_ids=ids, max_tokens=args.max_tokens, seq_len=2048, progress=False)
    res["perplexity_teacher_forced"] = perplexity(model, batch_size=4, **pk).perplexity
    base = cached_perplexity(model, kv=KVCacheConfig(), chunk=64, **pk).perplexity
    res["perplexity"] = {"full-precision": {"perplexity": base}}
    for k, kv in CONFIGS.items():
        p = cached_perplexity(model, kv=kv, chunk=64, **pk).perplexity
        res["perplexity"][k] = {"perplexity": p, "delta_pct": 100 * (p / base - 1)}
        print(f"ppl {k}: {p:.4f} ({100 * (p / base - 1):+.2f}%)", flush=True)
        save()
    res["attention_cosine"] = attention_fidelity(model, ids[40000:], CONFIGS, context=1024, probe=32, n_windows=2)
    save()
    prompts = heldout_prompts(tok, args.prompts, prompt_tokens=384)
    refs = greedy_with_cache(model, tok, prompts, KVCacheConfig(), 128)
    res["bleu4_vs_full_precision"] = {}
    for k, kv in CONFIGS.items():
        res["bleu4_vs_full_precision"][k] = bleu_vs_baseline(greedy_with_cache(model, tok, prompts, kv, 128), refs)
        print(f"bleu {k}: {res['bleu4_vs_full_precision'][k]:.2f}", flush=True)
        save()
    print_table("KV cache quality, open-autoglm-base (CPU)", ["cache", "KV bytes vs bf16 @2048", "ppl", "dppl %",
                "attn cos mean", "BLEU-4"],
                [[k, f"{res['kv_bytes_2048'][k]['vs_bf16']:.3f}", f"{res['perplexity'][k]['perplexity']:.3f}",
                  f"{res['perplexity'][k]['delta_pct']:+.2f}", f"{res['attention_cosine'][k]['mean']:.4f}",
                  f"{res['bleu4_vs_full_precision'][k]:.1f}"] for k in CONFIGS])
    save()
    return res
