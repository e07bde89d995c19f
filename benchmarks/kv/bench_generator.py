"""Decode-speed rows in openautoglm.generation.generator.Generator (compiled layer step, CUDA graph) and a kernel profile.

The Generator's own full-precision static buffers + SDPA (``bf16-static``) and its quantized cache
(``Generator(kv=KVCacheConfig(bits, ...))``: the device append kernel and the fused split-KV decode kernel),
filled with the same synthetic keys/values as the other rows (:mod:`benchmarks.kv.bench_gpu`).
"""

from __future__ import annotations

import time

import torch

from benchmarks._harness import sync
from benchmarks.kv.bench_gpu import CHUNK, _kv, free_memory, seconds_per_step, share_pairs


def kv_config(kind: str, n_layers: int):
    from openautoglm.kv import KVCacheConfig

    if kind == "bf16-static":
        return None
    share = tuple(share_pairs(n_layers)) if kind.endswith("share25") else ()
    return KVCacheConfig(bits=int(kind[3]), group_size=64, residual_length=128, share_layers=share)


@torch.no_grad()
def generator_row(model, kind: str, batch: int, ctx: int, steps: int, device: str, weights_bytes: int) -> dict:
    """Decode tokens/s in openautoglm.generation.generator.Generator from ``ctx`` synthetic tokens (compiled, CUDA graph)."""
    from openautoglm.generation.generator import Generator

    n = model.config.num_hidden_layers
    kv = kv_config(kind, n)
    gen = Generator(model, kv=kv)
    gen.layers = gen.layers[:n]
    length = ctx + steps + 16
    st = gen._buffers(batch, length)
    if kv is None:
        for s in range(0, ctx, CHUNK):
            m = min(CHUNK, ctx - s)
            for i in range(n):
                k, v = _kv(model, batch, m, device, 1000 * s + i)
                st["k"][i][:, :, s : s + m], st["v"][i][:, :, s : s + m] = k, v
        kv_bytes = sum(t.untyped_storage().nbytes() for t in st["k"] + st["v"])
        rings = []
    else:
        stores = st["kv"]
        stores.reset()
        for s in range(0, ctx, CHUNK):
            m = min(CHUNK, ctx - s)
            for i in range(n):
                if i not in stores.share:
                    k, v = _kv(model, batch, m, device, 1000 * s + i)
                    stores.stores[i].append(k, v)
        kv_bytes = stores.nbytes()
        rings = [(x, x.rk.clone(), x.rv.clone()) for i, x in enumerate(stores.stores) if i not in stores.share]
    g = torch.Generator(device=device).manual_seed(7)
    tok0 = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g, device=device)

    def reset():
        st["tok"].copy_(tok0)
        st["pos"].fill_(ctx)
        st["start"].fill_(ctx - 1)
        for x, rk, rv in rings:
            x.rk.copy_(rk)
            x.rv.copy_(rv)
            x.length_t.fill_(ctx)
            x._host_len = None

    sample = (1.0, None, 1.0, False)
    reset()
    t0 = time.perf_counter()
    graph = device == "cuda"
    if graph:
        gen._capture(st, sample)
    sync()
    row = {"kind": kind, "batch": batch, "context": ctx, "layers": n, "harness": "Generator", "graph": graph,
           "compile_and_capture_s": time.perf_counter() - t0, "kv_bytes": kv_bytes}
    seqs = []
    for use_graph in ((False, True) if graph else (False,)):
        reset()
        seq = []
        for _ in range(4):
            st["graph"].replay() if use_graph else gen._step(st, sample)
            seq.append(st["tok"].clone())
        seqs.append(torch.cat(seq, 1))
    row["graph_matches_eager"] = bool(torch.equal(seqs[0], seqs[-1]))
    res = []
    for _ in range(3):
        reset()
        sync()
        step = st["graph"].replay if graph else (lambda: gen._step(st, sample))
        res.append(seconds_per_step(step, steps, graph))
    t = sorted(res)[1]
    row.update(ms_per_step=1000 * t, tokens_per_s=batch / t, steps=steps)
    kv_read = kv_bytes * (4 / 3 if kind.endswith("share25") else 1)  # shared layers read their source again
    row["achieved_gb_s"] = (weights_bytes + kv_read) / t / 1e9
    del gen, st
    free_memory()
    return row


@torch.no_grad()
def profile_step(model, spec: str, device: str, weights_bytes: int, layers: int = 8) -> dict:
    """Top CUDA kernels of a few Generator decode steps (eager replay of the compiled step) for ``kind@ctx x batch``."""
    from openautoglm.generation.generator import Generator

    if device != "cuda":
        return {"spec": spec, "skipped": "no CUDA device"}
    kind, shape = spec.split("@")
    ctx, batch = (int(x) for x in shape.split("x"))
    model.config.num_hidden_layers = layers
    gen = Generator(model, kv=kv_config(kind, layers))
    gen.layers = gen.layers[:layers]
    st = gen._buffers(batch, ctx + 64)
    if "kv" in st:
        st["kv"].reset()
        for i, x in enumerate(st["kv"].stores):
            if i not in st["kv"].share:
                x.append(*_kv(model, batch, ctx, device, i))
    st["pos"].fill_(ctx)
    st["start"].fill_(ctx - 1)
    sample = (1.0, None, 1.0, False)
    for _ in range(2):
        gen._step(st, sample)
    sync()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            gen._step(st, sample)
        sync()
    rows = []
    dev_t = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)  # noqa: E731
    for e in sorted(prof.key_averages(), key=lambda e: -dev_t(e))[:15]:
        rows.append({"kernel": e.key[:90], "calls": e.count, "cuda_us_total": dev_t(e)})
    print("profile", spec, *rows, sep="\n  ", flush=True)
    del gen, st
    free_memory()
    return {"spec": spec, "layers": layers, "steps": 3, "top_kernels": rows}
