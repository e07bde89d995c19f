"""CPU part of the KV-cache benchmark: the bundled model on its held-out text.

* KV bytes at the model's own 2048-token context (bf16 model; the storages each cache holds), for the
  growing caches (what ``generate``/``eval`` build) and the preallocated ones (compiled decode);
* perplexity with each cache (2048-token windows fed in 64-token chunks, so every chunk reads the
  compressed cache), attention-probability cosine vs the full-precision cache, BLEU-4 of 128-token greedy
  generations vs the full-precision model;
* cross-layer sharing at 12.5 / 25 / 37.5 % of the KV saved (1, 2, 3 of 8 layers), three strategies:
  MiniCache (adjacent deep layers merged, every token), KVSharer's order (the most dissimilar layer pairs,
  no check) and the calibrated greedy search (pairs chosen by their measured loss on calibration text: the
  last 2048 held-out tokens, disjoint from the evaluation windows).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks._harness import environment, print_table, write_json
from openautoglm import hub, _hf
from openautoglm.evaluate import bleu_vs_baseline, heldout_prompts, heldout_token_ids, perplexity
from openautoglm.kv import KVCacheConfig
from openautoglm.kv.metrics import attention_fidelity, cached_perplexity, greedy_with_cache
from openautoglm.kv.share_search import search_sharing

CONTEXT = 2048
QUANT = {
    "int8": KVCacheConfig(bits=8),
    "int4": KVCacheConfig(bits=4),
    "int2": KVCacheConfig(bits=2),
    "int8-r128": KVCacheConfig(bits=8, residual_length=128),
    "int4-r128": KVCacheConfig(bits=4, residual_length=128),
    "int2-r0": KVCacheConfig(bits=2, residual_length=0),
}


def minicache(n_pairs: int, n_layers: int = 8, bits=None) -> KVCacheConfig:
    return KVCacheConfig(bits=bits, share=True, share_start=n_layers - 2 * n_pairs, share_threshold=-1.0)


@torch.no_grad()
def kv_bytes(model, ids: torch.Tensor, kv: KVCacheConfig, **build) -> dict:
    cache = kv.build(model.config, **build)
    _hf.forward_with_cache(model, ids, cache, logits_to_keep=1)
    if hasattr(cache, "nbytes"):
        b = cache.nbytes()
    else:
        b = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes() for layer in cache.layers)
    return {"bytes": b, "residual_length": getattr(cache, "residual_length", None)}


def run(args) -> dict:
    t0 = time.time()
    name = "open-autoglm-base"
    sections = set(args.sections.split(","))
    tok = hub.load_tokenizer(name)
    ids = heldout_token_ids(tok)
    calib = ids[-CONTEXT:]  # calibration text for the sharing search: after every evaluation window
    res = {"environment": environment("cpu"), "model": name,
           "settings": {"seq_len": CONTEXT, "chunk": 64, "max_tokens": args.max_tokens, "attention_context": 1024,
                        "attention_probe": 32, "attention_windows": 2, "bleu_prompts": args.prompts,
                        "bleu_prompt_tokens": 384, "bleu_new_tokens": 128, "calibration_tokens": [-CONTEXT, None],
                        "residual_auto": "largest multiple of the group <= context/64 (context/16 at 2 bits), "
                                         "at most 128: 0 at 2048 for int8/int4, 128 for int2"}}
    out = Path(args.out)

    def save():
        res["elapsed_s"] = time.time() - t0
        write_json(out, res, indent=2)

    model = hub.from_pretrained(name, dtype="fp32", device="cpu")  # quality in fp32 (bf16 matmuls are slow on CPU)
    n_layers = _hf.num_layers(model.config)
    configs = dict(QUANT)
    if "share" in sections:
        res["share_search"] = {}
        for strategy, kw in (("greedy", {}), ("kvsharer", {"tolerance": float("inf")})):
            plan = search_sharing(model, calib, 3, strategy=strategy, seq_len=512, n_windows=4, progress=False, **kw)
            res["share_search"][strategy] = plan.to_dict()
            print(f"share search {strategy}: {plan.pairs} calibration ppl +{plan.to_dict()['calibration_ppl_increase_pct']}",
                  flush=True)
            for n in (1, 2, 3):
                configs[f"{strategy}-{n}of{n_layers}"] = KVCacheConfig(share_layers=tuple(plan.pairs[:n]))
            configs[f"int4+{strategy}-2of{n_layers}"] = KVCacheConfig(bits=4, share_layers=tuple(plan.pairs[:2]))
            save()
        for n in (1, 2, 3):
            configs[f"minicache-{n}of{n_layers}"] = minicache(n, n_layers)
        configs[f"int4+minicache-2of{n_layers}"] = minicache(2, n_layers, bits=4)
    res["configs"] = {k: v.to_dict() for k, v in configs.items()}

    if "bytes" in sections:  # at 2048 context with the model in bf16 (the dtype it ships in)
        mb = hub.from_pretrained(name, dtype="bf16", device="cpu")
        x = ids[:CONTEXT].view(1, -1)
        base = kv_bytes(mb, x, KVCacheConfig())["bytes"]
        res["kv_bytes_2048"] = {"bf16": {"bytes": base}}
        for k, kv in configs.items():
            row = kv_bytes(mb, x, kv, context=CONTEXT)
            row["vs_bf16"] = row["bytes"] / base
            if kv.bits is not None and not kv.share:
                st = kv_bytes(mb, x, kv, max_cache_len=CONTEXT)
                row["static_bytes"], row["static_vs_bf16"] = st["bytes"], st["bytes"] / base
            res["kv_bytes_2048"][k] = row
        del mb
        save()

    pk = dict(token_ids=ids, max_tokens=args.max_tokens, seq_len=CONTEXT, progress=False)
    if "ppl" in sections:
        res["perplexity_teacher_forced"] = perplexity(model, batch_size=4, **pk).perplexity
        base = cached_perplexity(model, kv=KVCacheConfig(), chunk=64, **pk).perplexity
        res["perplexity"] = {"full-precision": {"perplexity": base}}
        for k, kv in configs.items():
            p = cached_perplexity(model, kv=kv, chunk=64, **pk).perplexity
            res["perplexity"][k] = {"perplexity": p, "delta_pct": 100 * (p / base - 1)}
            print(f"ppl {k}: {p:.4f} ({100 * (p / base - 1):+.2f}%) [{time.time() - t0:.0f}s]", flush=True)
            save()
    main = {k: v for k, v in configs.items() if not k.startswith(("kvsharer", "minicache-1", "minicache-3",
                                                                    "greedy-1", "greedy-3"))}
    if "attention" in sections:
        res["attention_cosine"] = attention_fidelity(model, ids[40000:], main, context=1024, probe=32, n_windows=2)
        save()
    if "bleu" in sections:
        prompts = heldout_prompts(tok, args.prompts, prompt_tokens=384)
        refs = greedy_with_cache(model, tok, prompts, KVCacheConfig(), 128)
        res["bleu4_vs_full_precision"] = {}
        for k, kv in main.items():
            res["bleu4_vs_full_precision"][k] = bleu_vs_baseline(greedy_with_cache(model, tok, prompts, kv, 128), refs)
            print(f"bleu {k}: {res['bleu4_vs_full_precision'][k]:.2f}", flush=True)
            save()
    rows = []
    for k in configs:
        get = lambda sec, f="{:.4f}", key=None: (f.format(res[sec][k][key] if key else res[sec][k])  # noqa: E731
                                                 if k in res.get(sec, {}) else "")
        rows.append([k, get("kv_bytes_2048", "{:.3f}", "vs_bf16"), get("perplexity", "{:.3f}", "perplexity"),
                     get("perplexity", "{:+.2f}", "delta_pct"), get("attention_cosine", "{:.4f}", "mean"),
                     get("bleu4_vs_full_precision", "{:.1f}")])
    print_table("KV cache quality, open-autoglm-base (CPU)", ["cache", "KV bytes vs bf16 @2048", "ppl", "dppl %",
                "attn cos mean", "BLEU-4"], rows)
    save()
    return res
