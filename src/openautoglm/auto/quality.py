"""Quality of the compressed model against the original, on held-out text, and its measured memory.

Everything here runs the model as it will serve: perplexity is that of a token-by-token decode through the
recipe's KV cache (:func:`openautoglm.kv.emulate.decode_perplexity`, one pass, equal to the real cache fed one
token at a time), generations go through ``generate`` with the real cache, attention rows are read after a
prefill through it. The original's figures are taken before compression (:func:`baseline`), the compressed
model's after (:func:`compare`):

* held-out perplexity (the bundled held-out text's first half by default);
* BLEU-4 of greedy generations against the original's (``evaluate.bleu_vs_baseline``, sacrebleu);
* attention-score cosine: after a prefill of ``context`` tokens, the attention rows of ``probe`` more tokens
  compared with the original's, row by row, over the heads both models have (pruned heads left out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import _hf
from ..evaluate import bleu_vs_baseline, greedy_generate
from ..kv.config import KVCacheConfig
from ..kv.emulate import decode_perplexity
from ..kv.metrics import _eager_attention, _probe_attentions, greedy_with_cache
from ..memory.estimate import model_bytes
from ..memory.profile import MemoryProfiler


@dataclass
class Baseline:
    """The original model's held-out perplexity, generations and attention rows."""

    perplexity: float
    generations: list[str]
    prompts: list[str]
    attentions: list[list[torch.Tensor]] = field(default_factory=list, repr=False)  # [window][layer] (1,H,P,S)


def _probe_windows(ids: torch.Tensor, n: int, context: int, probe: int) -> list[torch.Tensor]:
    need = context + probe
    n = min(n, ids.numel() // need)
    return [ids[i * need:(i + 1) * need].view(1, -1) for i in range(n)]


@torch.no_grad()
def baseline(model: nn.Module, tokenizer, eval_ids: torch.Tensor, *, seq_len: int, prompts: list[str],
             new_tokens: int, probe_context: int = 512, probe: int = 32, probe_windows: int = 2) -> Baseline:
    ppl = decode_perplexity(model, None, token_ids=eval_ids, seq_len=seq_len).perplexity
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=new_tokens) if prompts else []
    dev = next(model.parameters()).device
    atts = []
    with _eager_attention(model):
        for w in _probe_windows(eval_ids, probe_windows, probe_context, probe):
            atts.append([a.cpu() for a in _probe_attentions(model, w.to(dev), KVCacheConfig(), probe_context, 64)])
    return Baseline(ppl, gens, prompts, atts)


def _kept_heads(n_heads: int, removed: list[int]) -> list[int]:
    gone = set(removed)
    return [h for h in range(n_heads) if h not in gone]


@torch.no_grad()
def compare(model: nn.Module, tokenizer, eval_ids: torch.Tensor, base: Baseline, kv: KVCacheConfig | None, *,
            seq_len: int, new_tokens: int, removed: dict[int, list[int]] | None = None,
            probe_context: int = 512, probe: int = 32) -> dict:
    """Held-out perplexity, BLEU-4 and attention cosine of the compressed ``model`` against ``base``."""
    kv = kv or KVCacheConfig()
    ppl = decode_perplexity(model, kv, token_ids=eval_ids, seq_len=seq_len).perplexity
    out = {"perplexity": ppl, "perplexity_original": base.perplexity,
           "perplexity_increase": ppl / base.perplexity - 1.0}
    if base.prompts:
        gens = greedy_with_cache(model, tokenizer, base.prompts, kv, max_new_tokens=new_tokens)
        out["bleu4"] = bleu_vs_baseline(gens, base.generations)
        out["generations"] = [{"prompt": p, "original": o, "compressed": c}
                              for p, o, c in zip(base.prompts, base.generations, gens)]
    dev = next(model.parameters()).device
    removed = removed or {}
    cos = []
    with _eager_attention(model):
        for w, ref in zip(_probe_windows(eval_ids, len(base.attentions), probe_context, probe), base.attentions):
            got = _probe_attentions(model, w.to(dev), kv, probe_context, 64)
            for layer, (a, b) in enumerate(zip(ref, got)):
                a = a[:, _kept_heads(a.shape[1], removed.get(layer, []))].to(b.device)
                cos.append(F.cosine_similarity(a, b.float(), dim=-1).flatten().cpu())
    if cos:
        c = torch.cat(cos)
        out["attention_cosine"] = {"mean": float(c.mean()), "min": float(c.min()), "rows": int(c.numel())}
    return out


@torch.no_grad()
def measure_memory(model: nn.Module, kv: KVCacheConfig | None, *, batch: int, context: int,
                   decode_steps: int = 2) -> dict:
    """Peak memory of a prefill of ``batch`` x ``context`` tokens through the recipe's cache plus a few decode
    steps (``memory.MemoryProfiler``: ``torch.cuda.max_memory_allocated`` on CUDA, live tensor bytes on CPU)."""

    dev = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(dev)
    kv = kv or KVCacheConfig()
    cache = kv.build(model.config, context=context)  # the window "auto" sizes to the served context
    with MemoryProfiler(device=dev, model=model) as prof:
        out = _hf.forward_with_cache(model, ids[:, : context - decode_steps], cache, logits_to_keep=1)
        for s in range(context - decode_steps, context):
            out = _hf.forward_with_cache(model, ids[:, s : s + 1], cache, logits_to_keep=1)
        del out
    kv_bytes = cache.nbytes() if hasattr(cache, "nbytes") else sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
    res = {"peak": int(prof.peak_bytes), "weights": model_bytes(model), "kv_cache": int(kv_bytes),
           "device": str(dev)}
    if dev.type == "cuda":
        res["reserved_peak"] = int(torch.cuda.max_memory_reserved(dev))
    res["activations+workspace"] = res["peak"] - res["weights"] - res["kv_cache"]
    return res
