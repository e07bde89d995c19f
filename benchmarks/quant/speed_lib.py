"""Rows of :mod:`benchmarks.quant.speed`: quantize a variant, time it in the Generator or through ``model.generate``,
profile, report."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from benchmarks._harness import sync, write_json as _write_json
from benchmarks.quant.bench_lib import plot as plot_rows
from openautoglm.generation.generator import Generator
from openautoglm.memory.estimate import model_bytes
from openautoglm.quant import DynamicQuantizer, QuantConfig, quantize

REFS: dict = {}  # shape -> bf16 logits of a fixed prompt (cosine of every variant against it)
PEERS = {"w4": "ao-int4wo", "w8": "ao-int8wo", "w8a8": "ao-fp8dq"}  # our variant -> torchao's matching config
PROFILE_PREFILL = ("bf16", "w4", "w8", "w8a8", "ao-int8wo")  # prefill rows broken down by kernel kind (torch.profiler)


def apply_variant(model: nn.Module, variant: str) -> str:
    """Quantize ``model`` in place; returns the concrete scheme."""
    if variant == "bf16":
        return "bf16"
    if variant == "w8a8":
        DynamicQuantizer.quantize(model, bits=8)  # the faster of int8 / e4m3 on this GPU
        return model.quant_result.config.scheme
    if variant in ("w4", "w8"):
        quantize(model, QuantConfig(scheme=variant))
        return variant
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8WeightOnlyConfig, PerRow, quantize_)

    cfg = {"ao-int4wo": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
           "ao-int8wo": lambda: Int8WeightOnlyConfig(version=2),
           "ao-fp8dq": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())}[variant]()
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)
    return variant


def _prompt(batch, length, dev, vocab, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), device=dev, generator=g)


def decode_row(model, shape, variant, dev, args, batches, log, profile=False, prefill=True) -> dict:
    """Generator decode at ``batches``, prefill at ``args.prefill`` tokens (``prefill``), bytes, cosine vs bf16,
    peak memory. ``variant`` may carry an ablation suffix (``w4@sdpa``): quantized as the part before ``@``."""
    r = {"variant": variant}
    t = time.time()
    r["scheme"] = apply_variant(model, variant.partition("@")[0])
    sync()
    r["quantize_s"] = time.time() - t
    vocab = model.config.vocab_size
    r["weight_bytes"] = model_bytes(model)
    r["read_bytes_per_token"] = r["weight_bytes"] - model.get_input_embeddings().weight.numel() * 2
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = Generator(model)
    for b in batches:
        prompt = _prompt(b, args.prompt, dev, vocab, b)
        first = gen.generate(prompt, args.new)
        runs = [gen.generate(prompt, args.new) for _ in range(2)]
        best = max(runs, key=lambda x: x.tokens_per_s)
        r[f"decode_b{b}"] = {"tokens_per_s": best.tokens_per_s, "runs_tokens_per_s": [x.tokens_per_s for x in runs],
                             "ms_per_step": 1e3 / best.tokens_per_s * b, "first_call_compile_s": first.compile_s,
                             "same_tokens_as_first_call": all(torch.equal(x.tokens, first.tokens) for x in runs)}
        log(shape, variant, f"b{b}", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r[f"decode_b{b}"].items()})
        if b == 1 and profile:
            r["profile_b1"] = profile_step(gen, log)
    if not prefill:
        del gen
        if dev.type == "cuda":
            r["peak_bytes"] = torch.cuda.max_memory_allocated()
        return r
    pids = _prompt(1, args.prefill, dev, vocab, 3)
    pf = prefill_ms(gen, pids)
    r["prefill_ms"], r["prefill_runs"] = pf.pop("ms"), pf
    if dev.type == "cuda" and shape != "smoke" and variant in PROFILE_PREFILL:
        r["prefill_profile"] = profile_prefill(gen, pids)
        log(shape, variant, "prefill profile", {k: round(v, 2) for k, v in r["prefill_profile"]["by_kind_ms"].items()})
    if variant in ("w4", "w8"):  # the same prefill with one dequantize + GEMM per layer (no q/k/v, gate/up fusion)
        from openautoglm.quant import kernels

        kernels.FUSE_PREFILL = False
        try:
            pf = prefill_ms(gen, pids)
            r["prefill_unfused_ms"], r["prefill_unfused_runs"] = pf.pop("ms"), pf
        finally:
            kernels.FUSE_PREFILL = True
        log(shape, variant, "prefill ms unfused", round(r["prefill_unfused_ms"], 2))
    del gen
    ids = _prompt(1, 64, dev, vocab, 7)
    with torch.no_grad():
        logits = model(ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    if variant == "bf16":
        REFS[shape] = logits
    elif shape in REFS:
        r["logits_cosine_vs_bf16"] = float(nn.functional.cosine_similarity(logits, REFS[shape], 0))
    if dev.type == "cuda":
        r["peak_bytes"] = torch.cuda.max_memory_allocated()
    log(shape, variant, "prefill ms", round(r["prefill_ms"], 2), "cos", r.get("logits_cosine_vs_bf16"))
    return r


def prefill_ms(gen: Generator, ids: torch.Tensor, reps: int = 5) -> dict:
    """Prefills of ``ids (1, P)`` through the helper's compiled layer (what ``generate`` runs first), timed
    without the decode graph a full ``generate`` call would capture for this cache length: two warm-up calls
    (compilation), then ``reps`` timed ones. GPU time between CUDA events and host wall time of each; the
    median GPU time is the figure (wall time well above it would mean the host, not the GPU, sets the pace)."""
    P = ids.shape[1]
    st = gen._buffers(1, -(-(P + 1) // 256) * 256)
    pos = torch.arange(P, device=ids.device)
    gpu, wall = [], []
    cuda = ids.is_cuda
    with torch.no_grad():
        for i in range(2 + reps):
            sync()
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t = time.perf_counter()
            gen._forward(st, ids, pos, gen._pre)
            if cuda:
                b.record()
            sync()
            if i >= 2:
                wall.append(1e3 * (time.perf_counter() - t))
                gpu.append(a.elapsed_time(b) if cuda else wall[-1])
    return {"ms": statistics.median(gpu), "gpu_ms_runs": gpu, "wall_ms_runs": wall}


def profile_prefill(gen: Generator, ids: torch.Tensor) -> dict:
    """Kernel time of one (warm) prefill by kind: cuBLAS GEMMs, our dequantize, attention, inductor's fused
    kernels, the rest; against the prefill's GPU time."""
    from torch.profiler import ProfilerActivity, profile

    P = ids.shape[1]
    st = gen._buffers(1, -(-(P + 1) // 256) * 256)
    pos = torch.arange(P, device=ids.device)
    with torch.no_grad():
        gen._forward(st, ids, pos, gen._pre)
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen._forward(st, ids, pos, gen._pre)
            sync()
    kinds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        n = e.name.lower()
        kind = ("dequantize (ours)" if "dequant" in n
                else "attention" if ("flash" in n or "attention" in n or "fmha" in n or "sdpa" in n)
                else "fp8 / int8 GEMM" if ("scaled_mm" in n or "f8" in n or "e4m3" in n or "s8s8" in n or "imma" in n or "int8" in n)
                else "GEMM (cuBLAS / CUTLASS)" if ("gemm" in n or "sm90" in n or "nvjet" in n or "cutlass" in n
                                                   or "xmma" in n)
                else "activation quantization (ours)" if "quant_rows" in n
                else "inductor fused (norms, rope, residual, silu)" if n.startswith("triton_")
                else "other")
        kinds[kind] += us
        counts[kind] += 1
    return {"kernel_busy_ms": sum(kinds.values()) / 1e3, "by_kind_ms": {k: v / 1e3 for k, v in kinds.items()},
            "launches": dict(counts)}


def profile_step(gen: Generator, log, steps: int = 5) -> dict:
    """Kernel time of the captured decode step by kind (torch.profiler over graph replays) vs its wall time."""
    from torch.profiler import ProfilerActivity, profile

    st = next(s for s in gen._state.values() if s.get("graph") is not None)
    st["pos"].fill_(200)
    st["graph"].replay()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            st["graph"].replay()
        sync()
        wall = (time.perf_counter() - t) / steps
    kinds: dict[str, float] = defaultdict(float)
    names: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time / steps if hasattr(e, "device_time") else e.cuda_time / steps
        n = e.name
        ln = n.lower()
        kind = ("inductor fused (norms, rope, cache write, residual, silu)" if n.startswith("triton_")
                else "attention" if ("dense_decode" in n or "flash" in ln or "attention" in ln or "fmha" in ln
                                     or "attn" in ln)
                else "gemv w4/w8/fp8 (ours)" if ("decode_kernel" in n or "decode_dot" in n or "gemv_kernel" in n)
                else "lm_head / bf16 GEMM (cuBLAS)" if ("gemm" in ln or "gemv" in ln or "sm90" in ln or "nvjet" in ln)
                else "other")
        kinds[kind] += us
        names[n][0] += us
        names[n][1] += 1
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:12]
    busy = sum(kinds.values())
    out = {"step_wall_us": wall * 1e6, "kernel_busy_us": busy, "idle_or_launch_gap_us": wall * 1e6 - busy,
           "by_kind_us": dict(kinds), "top_kernels": [[n[:90], round(v[0], 1), v[1] // steps] for n, v in top]}
    log("profile decode step b1", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in out.items()
                                   if k != "top_kernels"})
    return out


def generate_row(model, variant, dev, args, log) -> dict:
    """``model.generate(..., cache_implementation="static")`` twice in one call, the same prompt and arguments:
    transformers' loop (openautoglm's routing off; transformers compiles the forward, fullgraph=True, so a graph
    break fails the row instead of hiding in the figure) and the routed path (``enable_fast_generate``: the call
    runs the compiled CUDA-graph decode, ``Generator``). Each: first call, then the best of two; ``routed`` also
    says whether its output equals transformers' (``same_as_transformers``) and which path served the calls."""
    from transformers import CompileConfig

    from openautoglm.generation import enable_fast_generate
    from openautoglm.generation.routing import routed

    r = {"variant": variant, "scheme": apply_variant(model, variant)}
    prompt = _prompt(1, args.prompt, dev, model.config.vocab_size, 11)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, cache_implementation="static",
              pad_token_id=0)
    enable_fast_generate(model, enabled=False)  # transformers' own loop (quantize() installs the routing)
    hf_kw = dict(kw, compile_config=CompileConfig(fullgraph=True))
    t = time.perf_counter()
    try:
        first = model.generate(prompt, **hf_kw)
        r["fullgraph"] = True
    except Exception as e:  # noqa: BLE001 - a graph break: record it, time transformers' default compile
        r["fullgraph"], r["fullgraph_error"] = False, repr(e)[:300]
        torch._dynamo.reset()
        hf_kw.pop("compile_config")
        first = model.generate(prompt, **hf_kw)
    sync()
    r["first_call_s"] = time.perf_counter() - t
    out, r["call_s"] = _time_calls(model, prompt, hf_kw)
    r["tokens_per_s"] = args.new / min(r["call_s"])
    r["same_tokens"] = bool(torch.equal(out, first))
    enable_fast_generate(model, allow_cpu=dev.type == "cpu")  # the CPU smoke runs the same path eagerly
    t = time.perf_counter()
    fast_first = model.generate(prompt, **kw)
    sync()
    fr = {"first_call_s": time.perf_counter() - t}
    fast, fr["call_s"] = _time_calls(model, prompt, kw)
    fr["tokens_per_s"] = args.new / min(fr["call_s"])
    fr["same_tokens"] = bool(torch.equal(fast, fast_first))
    fr["same_as_transformers"] = bool(fast.shape == out.shape and torch.equal(fast.to(out.device), out))
    fr["x_transformers"] = fr["tokens_per_s"] / r["tokens_per_s"]
    fr["calls"] = dict(routed(model).counts)  # {"fast": 3, "transformers": 0} when every call was routed
    r["routed"] = fr
    log("generate", variant, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "routed"},
        "routed", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in fr.items()})
    return r


def _time_calls(model, prompt, kw, n: int = 2) -> tuple[torch.Tensor, list[float]]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = model.generate(prompt, **kw)
        sync()
        times.append(time.perf_counter() - t)
    return out, times


def _ratios(res: dict) -> None:
    for shape, rows in res["models"].items():
        base = next((r for r in rows if r.get("variant") == "bf16" and "weight_bytes" in r), None)
        for r in rows:
            if "weight_bytes" not in r:
                continue
            d1 = r.get("decode_b1", {})
            if "tokens_per_s" in d1:
                d1["read_GBps"] = r["read_bytes_per_token"] * d1["tokens_per_s"] / 1e9
                d1["fraction_of_copy"] = d1["read_GBps"] / res["copy_GBps"]
            if base is None:
                continue
            r["weight_ratio_vs_bf16"] = r["weight_bytes"] / base["weight_bytes"]
            for k in ("decode_b1", "decode_b8"):
                if "tokens_per_s" in r.get(k, {}) and "tokens_per_s" in base.get(k, {}):
                    r[k]["x_bf16"] = r[k]["tokens_per_s"] / base[k]["tokens_per_s"]
            if r.get("prefill_ms") and base.get("prefill_ms"):
                r["prefill_x_bf16"] = base["prefill_ms"] / r["prefill_ms"]
            if r.get("prefill_unfused_ms") and base.get("prefill_ms"):
                r["prefill_unfused_x_bf16"] = base["prefill_ms"] / r["prefill_unfused_ms"]
        by = {r["variant"]: r for r in rows if "weight_bytes" in r}
        for ours, peer in PEERS.items():
            a, b = by.get(ours), by.get(peer)
            if a is None or b is None:
                continue
            cmp = {"peer": peer}
            for k in ("decode_b1", "decode_b8"):
                if "tokens_per_s" in a.get(k, {}) and "tokens_per_s" in b.get(k, {}):
                    cmp[k] = a[k]["tokens_per_s"] / b[k]["tokens_per_s"]
            if a.get("prefill_ms") and b.get("prefill_ms"):
                cmp["prefill"] = b["prefill_ms"] / a["prefill_ms"]
            a["x_torchao"] = cmp
    gens = res.get("generate", {})
    for k, g in gens.items():
        b = gens.get(k.split("/")[0] + "/bf16", {})
        if "tokens_per_s" in g and "tokens_per_s" in b:
            g["x_bf16_generate"] = g["tokens_per_s"] / b["tokens_per_s"]
        if "tokens_per_s" in g.get("routed", {}) and "tokens_per_s" in b.get("routed", {}):
            g["routed"]["x_bf16_generate"] = g["routed"]["tokens_per_s"] / b["routed"]["tokens_per_s"]


def write_json(res: dict, out: Path, plot: bool = False) -> None:
    """Ratios filled in, then ``speed.json`` (and with ``plot`` ``speed.png``) in ``out``."""
    _ratios(res)
    _write_json(out / "speed.json", res)
    if plot:
        plot_rows(res, out / "speed.png", decode_key="x_bf16", prefill_key="prefill_x_bf16", what="tok/s x bf16")


def summarize(res: dict) -> None:
    f = lambda v, w=7, p=2: f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  torchao {res['torchao']}  "
          f"copy {res['copy_GBps']:.0f} GB/s  wall {res.get('wall_s', 0):.0f} s")
    for r in res["kernels"]["rows"]:
        print(f"layer N={r['N']:>5} K={r['K']:>5} M={r['M']}: bf16 {f(r['bf16_us'], 6, 1)}us tinygemm "
              f"{f(r.get('tinygemm_us'), 6, 1)}us | " + " ".join(
                  f"f{x} {f(r.get(f'f{x}_us'), 6, 1)}us {f(r.get(f'f{x}_GBps'), 5, 0)}GB/s" for x in (5, 8, 9)))
    for r in res["kernels"]["prefill"]:
        print("prefill layer", {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
    print(f"{'model':6} {'variant':10} {'scheme':9} {'GB':>6} {'b1 tok/s':>9} {'x':>5} {'%copy':>6} {'b8 tok/s':>9} "
          f"{'x':>5} {'pf ms':>7} {'x':>5} {'cos':>6}")
    for s, rows in res["models"].items():
        for r in rows:
            if "weight_bytes" not in r:
                print(f"{s:6} {r['variant']:10} {r.get('error', '')[:100]}")
                continue
            d1, d8 = r.get("decode_b1", {}), r.get("decode_b8", {})
            print(f"{s:6} {r['variant']:10} {r['scheme']:9} {f(r['weight_bytes'] / 1e9, 6)} {f(d1.get('tokens_per_s'), 9, 1)} "
                  f"{f(d1.get('x_bf16'), 5)} {f(100 * d1.get('fraction_of_copy', 0), 6, 1)} {f(d8.get('tokens_per_s'), 9, 1)} "
                  f"{f(d8.get('x_bf16'), 5)} {f(r.get('prefill_ms'), 7, 1)} {f(r.get('prefill_x_bf16'), 5)} "
                  f"{f(r.get('logits_cosine_vs_bf16'), 6, 4)}")
    for k, g in res.get("generate", {}).items():
        print(f"generate {k}: {f(g.get('tokens_per_s'), 7, 1)} tok/s x{f(g.get('x_bf16_generate'), 4)} "
              f"first {f(g.get('first_call_s'), 5, 1)} s fullgraph {g.get('fullgraph')} {g.get('error', '')[:100]}")
        if "routed" in g:
            fr = g["routed"]
            print(f"generate {k} routed: {f(fr.get('tokens_per_s'), 7, 1)} tok/s x{f(fr.get('x_bf16_generate'), 4)} "
                  f"x{f(fr.get('x_transformers'), 4)} transformers' first {f(fr.get('first_call_s'), 5, 1)} s "
                  f"same output {fr.get('same_as_transformers')} calls {fr.get('calls')}")
    print("skipped:", res.get("skipped", []))
