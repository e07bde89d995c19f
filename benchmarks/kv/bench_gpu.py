"""GPU part of the KV-cache benchmark: 7B-shaped random Llama (Llama-2-7B shapes, bf16).

Caches compared, all filled with the same synthetic keys/values (so no prefill is timed):

Decode speed, in openautoglm.generation.generator.Generator (one decoder layer compiled with torch.compile(fullgraph=True)
and shared by every layer, the whole decode step captured in one CUDA graph):
  bf16-static      the Generator's full-precision static K/V buffers + SDPA
  int8 / int4      Generator(kv=KVCacheConfig(bits)): preallocated quantized stores, device append kernel and
                   fused split-KV decode attention (Triton)
  int4+share25     the same with every fourth layer reading the previous layer's cache (25% fewer layers)
In the transformers forward (model(...) with a Cache object; the step captured in a CUDA graph where the cache
allows it):
  hf-bf16-static   transformers StaticCache + sdpa (what cache_implementation="static" gives)
  hf-quanto-int4   transformers QuantizedCache (quanto backend): its cache grows by torch.cat, so the step
                   runs eagerly (it cannot be captured in a CUDA graph)
Largest batch: the transformers forward (one real decode step, eager) with StaticCache (bf16) or
QuantizedKVCache(max_cache_len) + fused attention, then the step captured in a CUDA graph for the aggregate rate.
"""

from __future__ import annotations

import gc

import torch

from benchmarks._harness import capture, event_ms, sync
from openautoglm import _hf
from openautoglm.kv import QuantizedKVCache
from openautoglm.kv.attention import disable_fused_attention, enable_fused_attention

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=65536)
SMOKE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, head_dim=64, vocab_size=1024, max_position_embeddings=65536)
OURS = ("int8", "int4", "int4+share25")
GENERATOR = ("bf16-static", "int8", "int4", "int4+share25")
CHUNK = 2048


def seconds_per_step(step, steps: int, cuda: bool) -> float:
    """Seconds per call of ``step()`` over ``steps`` calls queued between two CUDA events (wall time on the CPU)."""
    return event_ms(step, reps=1, warmup=0, inner=steps, cuda=cuda) / 1e3


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def build_model(smoke: bool, device: str, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(SMOKE if smoke else LLAMA7B), tie_word_embeddings=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    if layers:
        use_layers(model, layers)
    return model


def use_layers(model, n: int) -> None:
    """Run only the first ``n`` decoder layers (the rest stay allocated; set n back to restore)."""
    model.config.num_hidden_layers = n


def share_pairs(n_layers: int) -> list[tuple[int, int]]:
    """Every fourth layer reads the previous layer's cache: (2, 3), (6, 7), ... (25% of the layers)."""
    return [(i - 1, i) for i in range(3, n_layers, 4)]


def make_cache(kind: str, model, capacity: int):
    from transformers import QuantizedCache, StaticCache

    cfg = model.config
    if kind in ("bf16-static", "hf-bf16-static"):
        return StaticCache(config=cfg, max_cache_len=capacity)
    if kind == "hf-quanto-int4":
        return QuantizedCache(backend="quanto", config=cfg, nbits=4, q_group_size=64, residual_length=128)
    share = share_pairs(cfg.num_hidden_layers) if kind.endswith("share25") else None
    return QuantizedKVCache(int(kind[3]), 64, 128, config=cfg, max_cache_len=capacity, share=share)


def _kv(model, batch, n, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    h, d = _hf.num_kv_heads(model.config), _hf.head_dim(model.config)
    k = torch.randn(batch, h, n, d, generator=g, device=device, dtype=torch.bfloat16)
    return k, torch.randn(batch, h, n, d, generator=g, device=device, dtype=torch.bfloat16)


@torch.no_grad()
def fill(model, cache, kind: str, batch: int, ctx: int, device: str, random_state: bool = False) -> None:
    """Put ``ctx`` tokens of synthetic K/V in every layer (the same data for every cache kind).

    ``random_state``: allocate and fill the buffers with random bytes and set the length (no quantization
    work; for the memory search, where only the size and one real decode step matter).
    """
    n_layers = model.config.num_hidden_layers
    if random_state:
        k1, v1 = _kv(model, batch, 1, device, 0)
        for i in range(n_layers):
            if kind in ("bf16-static", "hf-bf16-static"):
                layer = cache.layers[i]
                cache.update(k1, v1, i)
                layer.keys.normal_()
                layer.values.normal_()
                layer.cumulative_length.fill_(ctx)
            else:
                slot = cache.layers[i].slot
                if not hasattr(slot, "length_t"):
                    continue  # shared layer: reads the previous layer's store
                slot._check(k1, v1)
                for t in (slot.kq, slot.vq):
                    t.random_(0, 256)
                for t in (slot.ks, slot.vs, slot.rk, slot.rv):
                    t.uniform_(0.0, 0.05)
                for t in (slot.km, slot.vm):
                    t.uniform_(-1.0, 0.0)
                slot.length_t.fill_(ctx)
                slot._host_len = ctx
        return
    for s in range(0, ctx, CHUNK):
        n = min(CHUNK, ctx - s)
        for i in range(n_layers):
            k, v = _kv(model, batch, n, device, 1000 * s + i)
            if kind in OURS:
                slot = cache.layers[i].slot
                if hasattr(slot, "append"):
                    slot.append(k, v)
            else:
                cache.update(k, v, i)
            del k, v


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    seen = {}
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and t.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class Decoder:
    """Greedy decode from position ``ctx`` with the whole step captured in one CUDA graph (eager on CPU
    and for caches that cannot be captured). ``reset`` rewinds the cache to ``ctx`` tokens."""

    def __init__(self, model, cache, kind: str, batch: int, ctx: int, device: str, graph: bool = True):
        self.model, self.cache, self.kind, self.ctx = model, cache, kind, ctx
        g = torch.Generator(device=device).manual_seed(7)
        self.tok0 = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g, device=device)
        self.tok = self.tok0.clone()
        self.pos = torch.full((batch, 1), ctx, device=device, dtype=torch.long)
        self.kw = _hf.cache_kwarg(model)
        self.rings = []
        if kind in OURS:
            self.rings = [(layer.slot, layer.slot.rk.clone(), layer.slot.rv.clone()) for layer in cache.layers
                          if hasattr(layer.slot, "rk")]
        self.graph, self.graph_error = None, None
        if graph and device == "cuda" and kind != "hf-quanto-int4":
            self.graph, self.graph_error = capture(self.step, warmup=2, reset=self.reset)  # else the eager loop
            self.reset()

    @torch.no_grad()
    def step(self):
        out = self.model(input_ids=self.tok, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                         **{self.kw: self.cache})
        self.tok.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.add_(1)
        return out.logits

    def replay(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def reset(self):
        self.tok.copy_(self.tok0)
        self.pos.fill_(self.ctx)
        for layer in self.cache.layers:
            c = getattr(layer, "cumulative_length", None)
            if isinstance(c, torch.Tensor):
                c.fill_(self.ctx)
        for slot, rk, rv in self.rings:
            slot.rk.copy_(rk)
            slot.rv.copy_(rv)
            slot.length_t.fill_(self.ctx)
            slot._host_len = None

    def time(self, steps: int, repeats: int = 3) -> float:
        """Median seconds per step over ``repeats`` runs of ``steps`` steps (CUDA events)."""
        res = []
        for _ in range(repeats):
            if self.kind != "hf-quanto-int4":
                self.reset()
            sync()
            res.append(seconds_per_step(self.replay, steps, torch.cuda.is_available()))
        return sorted(res)[len(res) // 2]

    def check(self, n: int = 4) -> bool:
        """The captured graph gives the same greedy tokens as the eager step for ``n`` steps."""
        if self.graph is None:
            return True
        toks = []
        for use_graph in (False, True):
            self.reset()
            seq = []
            for _ in range(n):
                self.graph.replay() if use_graph else self.step()
                seq.append(self.tok.clone())
            toks.append(torch.cat(seq, 1))
        self.reset()
        return bool(torch.equal(*toks))


def set_attention(model, kind: str) -> None:
    if kind in OURS:
        enable_fused_attention(model)
    else:
        disable_fused_attention(model)


@torch.no_grad()
def decode_row(model, kind: str, batch: int, ctx: int, steps: int, device: str, weights_bytes: int) -> dict:
    set_attention(model, kind)
    cap = ctx + steps + 16
    cache = make_cache(kind, model, cap)
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    fill(model, cache, kind, batch, ctx, device)
    dec = Decoder(model, cache, kind, batch, ctx, device)
    row = {"kind": kind, "batch": batch, "context": ctx, "layers": model.config.num_hidden_layers,
           "graph": dec.graph is not None, "graph_error": dec.graph_error}
    row["kv_bytes"] = cache_bytes(cache)
    if torch.cuda.is_available():
        row["allocated_delta"] = torch.cuda.memory_allocated() - before
        if kind == "hf-quanto-int4":  # its quantized tensors are not plain layer attributes: count allocations
            row["kv_bytes"] = row["allocated_delta"]
    if kind != "hf-quanto-int4":
        row["graph_matches_eager"] = dec.check()
    n = max(4, steps // 4) if kind == "hf-quanto-int4" else steps
    t = dec.time(n)
    row.update(ms_per_step=1000 * t, tokens_per_s=batch / t, steps=n)
    kv_read = row["kv_bytes"] * (4 / 3 if kind.endswith("share25") else 1)  # shared layers read their source again
    row["achieved_gb_s"] = (weights_bytes + kv_read) / t / 1e9
    del dec, cache
    free_memory()
    return row


@torch.no_grad()
def fits(model, kind: str, batch: int, ctx: int, device: str, time_steps: int = 0) -> dict | None:
    """Allocate the cache for ``batch`` x ``ctx`` (random contents), run one real decode step; optionally
    time ``time_steps`` more (CUDA graph when it fits). None when out of memory."""
    cache = dec = None
    try:
        set_attention(model, kind)
        cache = make_cache(kind, model, ctx + max(time_steps, 1) + 8)
        fill(model, cache, kind, batch, ctx, device, random_state=True)
        dec = Decoder(model, cache, kind, batch, ctx, device, graph=False)
        dec.step()
        sync()
        out = {"batch": batch, "kv_bytes": cache_bytes(cache)}
        if time_steps:
            try:
                dec = Decoder(model, cache, kind, batch, ctx, device, graph=True)
            except torch.OutOfMemoryError:
                dec = Decoder(model, cache, kind, batch, ctx, device, graph=False)
            t = dec.time(time_steps, repeats=2)
            out.update(ms_per_step=1000 * t, tokens_per_s=batch / t, graph=dec.graph is not None)
        return out
    except torch.OutOfMemoryError:
        return None
    finally:
        del dec, cache
        free_memory()


def max_batch(model, kind: str, ctx: int, device: str, per_seq: int, time_steps: int = 8, cap: int = 1024) -> dict:
    """Largest batch that fits: a guess from the bytes per sequence, verified (it fits, one more does not)."""
    free_memory()
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 4 << 30
    margin = 2 << 30  # one decode step's activations, logits and the CUDA graph's pool
    b = max(1, min(cap, (free - margin) // per_seq))
    tried: dict[int, bool] = {}

    def ok(n: int) -> bool:
        tried[n] = fits(model, kind, n, ctx, device) is not None
        return tried[n]

    lo = hi = None  # largest batch known to fit, smallest known not to
    if ok(b):
        lo, step = b, 1
        while hi is None and len(tried) < 8 and lo < cap:
            if ok(min(cap, lo + step)):
                lo, step = min(cap, lo + step), step * 2
            else:
                hi = min(cap, lo + step)
    else:
        hi, step = b, 1
        while lo is None and hi - step >= 1 and len(tried) < 8:
            if ok(hi - step):
                lo = hi - step
            else:
                hi, step = hi - step, step * 2
    while lo is not None and hi is not None and hi - lo > 1 and len(tried) < 12:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    best = lo
    res = {"context": ctx, "max_batch": best or 0, "verified_upper": best is not None and hi == best + 1,
           "tried": {str(k): v for k, v in sorted(tried.items())}, "predicted_per_seq_bytes": per_seq}
    if best:
        r = fits(model, kind, best, ctx, device, time_steps=time_steps)
        b = best
        while r is None and b > max(1, best - 4):  # the timed run (graph pool) did not fit: fewer sequences
            b -= 1
            r = fits(model, kind, b, ctx, device, time_steps=time_steps)
            res["timed_batch"] = b
        if r is not None:
            res.update({k: v for k, v in r.items() if k != "batch"})
    return res


def per_sequence_bytes(model, kind: str, ctx: int, device: str) -> int:
    """KV bytes of one sequence at ``ctx`` (allocated by the cache, all layers of the model)."""
    cache = make_cache(kind, model, ctx + 16)
    fill(model, cache, kind, 1, ctx, device, random_state=True)
    n = cache_bytes(cache)
    del cache
    free_memory()
    return n
