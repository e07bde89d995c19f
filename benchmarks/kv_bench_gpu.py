"""GPU part of the KV-cache benchmark: 7B-shaped random Llama in bf16 (Llama-2-7B shapes).

Measures, for the bf16 DynamicCache, a bf16 StaticCache, openautoglm QuantizedKVCache INT8/INT4/INT2
and the transformers QuantizedCache (quanto backend, when importable):
  * KV bytes after a chunked prefill of 2k / 8k / 32k tokens (torch.cuda.memory_allocated delta,
    and the cache's own storage sum);
  * decode tokens/s at 8k context (eager forward loop, batch 1, 160 steps: more than one residual
    window, so the transformers cache's periodic re-quantization is inside the timing);
  * the largest batch that fits at 8k and 32k context (cache filled, then one real decode step).
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from openautoglm import _hf
from openautoglm.kv import QuantizedKVCache

log = logging.getLogger("kv_bench")

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=32768 + 512)
SMOKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512, max_position_embeddings=4096)


def build_model(smoke: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(SMOKE if smoke else LLAMA7B), tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def _quanto_py_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's own pure-torch ``quanto::unpack`` (optimum/quanto/library/unpack.py), verbatim logic."""
    out = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
    return torch.cat(out).to(torch.uint8)


def quanto_available() -> str | None:
    """None if transformers' quanto backend can run here, else the reason."""
    try:
        import types

        import optimum.quanto  # noqa: F401
        from optimum.quanto.library.extensions import get_extension
        # quanto JIT-compiles its whole CUDA/C++ extension (AWQ, Marlin, ...) on first use (minutes);
        # give it its own pure-torch unpack instead so the cache runs without that build.
        for name in ("quanto_cuda", "quanto_cpp"):
            try:
                get_extension(name)._lib = types.SimpleNamespace(unpack=_quanto_py_unpack)
            except KeyError:
                pass
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def make_cache(kind: str, model, max_len: int = 0):
    from transformers import DynamicCache, QuantizedCache, StaticCache

    cfg = model.config
    if kind == "bf16-dynamic":
        return DynamicCache(config=cfg)
    if kind == "bf16-static":
        return StaticCache(config=cfg, max_cache_len=max_len)
    if kind.startswith("int"):
        return QuantizedKVCache(bits=int(kind[3]), group_size=64, residual_length=128, config=cfg)
    if kind == "hf-quanto-int4":
        return QuantizedCache(backend="quanto", config=cfg, nbits=4, q_group_size=64, residual_length=128)
    raise ValueError(kind)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def allocated() -> int:
    gc.collect()
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


@torch.no_grad()
def prefill(model, cache, ids, chunk: int):
    out = None
    for s in range(0, ids.shape[1], chunk):
        out = _hf.forward_with_cache(model, ids[:, s : s + chunk], cache, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def cache_bytes(cache) -> int | None:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()
    if all(getattr(l, "keys", None) is not None for l in cache.layers):
        return sum(l.keys.untyped_storage().nbytes() + l.values.untyped_storage().nbytes() for l in cache.layers)
    return None


@torch.no_grad()
def kv_bytes(model, kinds, contexts, chunk, device):
    rows = {}
    for kind in kinds:
        for ctx in contexts:
            ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=device)
            before = allocated()
            cache = make_cache(kind, model, ctx + 8)
            prefill(model, cache, ids, chunk)
            after = allocated()
            rows[f"{kind}@{ctx}"] = {"kind": kind, "context": ctx, "allocated_delta": after - before,
                                     "cache_storage": cache_bytes(cache)}
            del cache
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


@torch.no_grad()
def decode_speed(model, kinds, ctx, steps, chunk, device, batch: int = 1):
    res = {}
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=device)
    for kind in kinds:
        cache = make_cache(kind, model, ctx + steps + 8)
        x = prefill(model, cache, ids, chunk)
        for _ in range(3):  # warm-up (compilation of the dequantize happens on the first call)
            x = _hf.forward_with_cache(model, x, cache).logits[:, -1:].argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            x = _hf.forward_with_cache(model, x, cache).logits[:, -1:].argmax(-1)
        sync()
        dt = time.perf_counter() - t
        res[kind] = {"tokens_per_s": batch * steps / dt, "ms_per_step": 1000 * dt / steps, "steps": steps,
                     "context": ctx, "batch": batch}
        print(f"decode {kind} batch {batch}: {batch * steps / dt:.1f} tok/s", flush=True)
        del cache
        gc.collect()
    return res


@torch.no_grad()
def fits(model, kind, batch, ctx, chunk, device) -> bool:
    cache = None
    try:
        cache = make_cache(kind, model, ctx + 4)
        cfg = model.config
        h, d = _hf.num_kv_heads(cfg), _hf.head_dim(cfg)
        dt = next(model.parameters()).dtype
        for s in range(0, ctx, chunk):
            n = min(chunk, ctx - s)
            for layer in range(_hf.num_layers(cfg)):
                k = torch.randn(batch, h, n, d, device=device, dtype=dt)
                cache.update(k, torch.randn_like(k), layer)
                del k
        x = torch.zeros(batch, 1, dtype=torch.long, device=device)
        _hf.forward_with_cache(model, x, cache, logits_to_keep=1)
        sync()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del cache
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def max_batch(model, kind, ctx, per_token_bytes, chunk, device, cap=4096):
    """Largest batch whose cache (filled to ``ctx``) and one decode step fit: a guess from the measured
    bytes per token, then verified (it fits, and one more does not) or walked down."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # blocks cached by earlier sections are not free for mem_get_info
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 2**30
    b = max(1, min(cap, int(0.98 * free / (per_token_bytes * ctx))))
    tried = {}
    while b >= 1 and len(tried) < 6:
        tried[b] = fits(model, kind, b, ctx, chunk, device)
        if tried[b]:
            if b + 1 in tried or len(tried) >= 5:
                break
            b += 1
        else:
            ok = [k for k, v in tried.items() if v]
            if ok:
                break
            b = min(b - 1, int(b * 0.95))
    ok = [k for k, v in tried.items() if v]
    best = max(ok) if ok else 0
    return {"max_batch": best, "verified_upper": (best + 1) in tried and not tried[best + 1],
            "tried": {str(k): v for k, v in sorted(tried.items())}, "context": ctx}
