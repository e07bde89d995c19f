"""Quality of a compressed KV cache, measured with the cache really in the attention path.

A single teacher-forced forward over a window never reads a cache (every token attends to keys
computed in the same pass), so it cannot see KV compression. Here each window is fed in chunks of
``chunk`` tokens through the cache: every chunk's queries attend to the earlier chunks' keys and
values *as the cache stores them* (quantized, shared), i.e. prefill in pieces followed by decode.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import _hf
from .._util.modules import model_device
from ..evaluate import PerplexityResult, token_windows
from .config import KVCacheConfig


@torch.no_grad()
def cached_perplexity(
    model: nn.Module,
    tokenizer=None,
    text: str | None = None,
    *,
    kv: KVCacheConfig | None = None,
    token_ids: torch.Tensor | None = None,
    max_tokens: int | None = None,
    seq_len: int = 2048,
    chunk: int = 32,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity with the KV cache ``kv`` (default: full precision) read by every chunk after the first.

    The text is cut into non-overlapping windows of ``seq_len`` tokens (as ``evaluate.perplexity``);
    each window is fed ``chunk`` tokens at a time (``chunk=1``: pure decode) through a fresh cache.
    """
    kv = kv or KVCacheConfig()
    if chunk < 1 or chunk > seq_len:
        raise ValueError(f"chunk={chunk} must be in [1, seq_len={seq_len}]")
    windows = token_windows(tokenizer, text, token_ids=token_ids, max_tokens=max_tokens, seq_len=seq_len)
    n_win = windows.shape[0]
    dev = model_device(model)
    nll, count = 0.0, 0
    for i in tqdm(range(0, n_win, batch_size), desc=f"perplexity[{kv.label()}]", disable=not progress):
        x = windows[i : i + batch_size].to(dev)
        cache = kv.build(model.config, context=seq_len)
        for s in range(0, seq_len, chunk):
            logits = _hf.forward_with_cache(model, x[:, s : s + chunk], cache).logits.float()
            tgt = x[:, s + 1 : s + chunk + 1]
            logits = logits[:, : tgt.shape[1]]
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), reduction="sum").item()
            count += tgt.numel()
        del cache
    mean = nll / count
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=count, seq_len=seq_len)


@contextmanager
def _eager_attention(model: nn.Module):
    old = _hf.attention_implementation(model)
    _hf.set_attention_implementation(model, "eager")
    try:
        yield
    finally:
        _hf.set_attention_implementation(model, old)


@torch.no_grad()
def _probe_attentions(model, ids: torch.Tensor, kv: KVCacheConfig, context: int, chunk: int):
    cache = kv.build(model.config, context=ids.shape[1])
    for s in range(0, context, chunk):
        _hf.forward_with_cache(model, ids[:, s : min(s + chunk, context)], cache)
    out = _hf.forward_with_cache(model, ids[:, context:], cache, output_attentions=True)
    return [a.float() for a in out.attentions]  # per layer (1, heads, probe, context + probe)


@torch.no_grad()
def attention_fidelity(
    model: nn.Module,
    token_ids: torch.Tensor,
    kv: KVCacheConfig | dict[str, KVCacheConfig],
    *,
    context: int = 1024,
    probe: int = 32,
    n_windows: int = 4,
    chunk: int = 64,
) -> dict:
    """Cosine between attention-probability rows with ``kv`` and with the full-precision cache.

    For ``n_windows`` windows of held-out tokens, ``context`` tokens are prefilled through the cache in
    chunks, then ``probe`` more tokens are fed at once and every layer's attention probabilities
    (heads x probe queries x all keys) are compared row by row. Returns mean and min cosine (a dict
    of them per name when ``kv`` is a dict; the reference runs once).
    """
    kvs = kv if isinstance(kv, dict) else {"kv": kv}
    need = context + probe
    if token_ids.numel() < need * n_windows:
        raise ValueError(f"need {need * n_windows} tokens for {n_windows} windows of {need}; got {token_ids.numel()}")
    dev = model_device(model)
    cos_all: dict[str, list] = {name: [] for name in kvs}
    with _eager_attention(model):
        for w in range(n_windows):
            ids = token_ids[w * need : (w + 1) * need].view(1, -1).to(dev)
            ref = _probe_attentions(model, ids, KVCacheConfig(), context, chunk)
            for name, cfg in kvs.items():
                got = _probe_attentions(model, ids, cfg, context, chunk)
                for a, b in zip(ref, got):
                    cos_all[name].append(F.cosine_similarity(a, b, dim=-1).flatten())
    out = {}
    for name, parts in cos_all.items():
        cos = torch.cat(parts)
        out[name] = {"mean": float(cos.mean()), "min": float(cos.min()), "rows": int(cos.numel())}
    return out if isinstance(kv, dict) else out["kv"]


@torch.no_grad()
def greedy_with_cache(model, tokenizer, prompts: list[str], kv: KVCacheConfig, max_new_tokens: int = 128) -> list[str]:
    """Greedy continuations of each prompt (one at a time), each with a fresh cache built from ``kv``."""
    dev = model_device(model)
    outs = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids.to(dev)
        cache = kv.build(model.config, context=ids.shape[1] + max_new_tokens)
        gen = _hf.generate_with_cache(
            model, ids, cache, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
        outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs
