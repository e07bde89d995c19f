"""Where a decode step's time goes besides the GEMVs (GPU diagnostics of the decode path).

1. The decode attention of ``openautoglm.generation.generator.Generator`` under each SDPA backend inductor can lower the
   masked decode attention to (cuDNN, memory-efficient, math), bf16 and w4 7B-shaped Llama, batch 1: step time
   (CUDA-graph replays) and kernel time by kind (torch.profiler).
2. ``model.generate(..., cache_implementation="static")`` (transformers compiles the forward, mode
   reduce-overhead): per-token wall time for bf16 and w4, inductor's cudagraph counters and the host-side
   launch calls seen by the profiler (``cudaGraphLaunch`` vs ``cudaLaunchKernel``), to tell host overhead from a
   skipped CUDA graph.

Writes ``decode_diag.json`` to ``--out`` (default ``$OUT/quant``, else ``benchmarks/results/quant``).

    python -m benchmarks.quant.decode_diag [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import torch

from benchmarks._harness import environment, event_ms, log, out_dir, write_json
from benchmarks.quant.bench_lib import build
from benchmarks.quant.speed_lib import apply_variant
from openautoglm.generation import Generator, enable_fast_generate

BACKENDS = {"cudnn": dict(cudnn=True, efficient=True, flash=True, math=True),
            "efficient": dict(cudnn=False, efficient=True, flash=True, math=True),
            "math": dict(cudnn=False, efficient=False, flash=False, math=True)}


def set_backends(cudnn, efficient, flash, math):
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    torch.backends.cuda.enable_mem_efficient_sdp(efficient)
    torch.backends.cuda.enable_flash_sdp(flash)
    torch.backends.cuda.enable_math_sdp(math)


def step_profile(gen: Generator, steps: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile

    st = next(s for s in gen._state.values() if s.get("graph") is not None)
    st["pos"].fill_(200)
    step_us = event_ms(st["graph"].replay, reps=1, warmup=3, inner=20) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            st["graph"].replay()
        torch.cuda.synchronize()
    kinds, names = defaultdict(float), defaultdict(float)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time / steps
        n = e.name
        ln = n.lower()
        kind = ("attention" if ("dense_decode" in n or (("attention" in ln or "fmha" in ln or "flash" in ln)
                                                          and not ln.startswith("triton_")))
                else "gemv (ours)" if ("decode_kernel" in n or "gemv_kernel" in n or "decode_dot" in n)
                else "bf16 GEMM" if ("gemm" in ln or "nvjet" in ln or "sm90" in ln)
                else "inductor" if n.startswith("triton_") else "other")
        kinds[kind] += us
        names[n[:100]] += us
    top = sorted(names.items(), key=lambda kv: -kv[1])[:10]
    return {"step_us": step_us, "busy_us": sum(kinds.values()), "by_kind_us": dict(kinds),
            "top": [[n, round(v, 1)] for n, v in top]}


def attention_section(base, res):
    import torch._inductor.config as ic

    ic.force_disable_caches = True  # the SDPA backend flags are not part of the FX cache key: compile each variant
    out = res.setdefault("attention", {})
    for variant in ("bf16", "w4"):
        m = base if variant == "bf16" else copy.deepcopy(base)
        apply_variant(m, variant)
        enable_fast_generate(m, enabled=False)  # transformers' own loop (quantize() routes generate to Generator)
        prompt = torch.randint(0, m.config.vocab_size, (1, 128), device="cuda")
        ref = None
        for name, flags in BACKENDS.items():
            torch._dynamo.reset()
            set_backends(**flags)
            try:
                gen = Generator(m)
                r0 = gen.generate(prompt, 128)
                r = max((gen.generate(prompt, 128) for _ in range(2)), key=lambda x: x.tokens_per_s)
                row = {"tokens_per_s": r.tokens_per_s, "ms_per_step": 1e3 / r.tokens_per_s,
                       "compile_s": r0.compile_s, **step_profile(gen)}
                if ref is None:
                    ref = r.tokens
                row["same_tokens_as_cudnn"] = bool(torch.equal(r.tokens, ref))
            except Exception as e:  # noqa: BLE001
                row = {"error": repr(e)[:300]}
            out[f"{variant}/{name}"] = row
            log("attention", variant, name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                                             if k not in ("top",)})
            del gen
        set_backends(**BACKENDS["cudnn"])
        if variant != "bf16":
            del m
        torch.cuda.empty_cache()


def generate_section(base, res):
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile
    from transformers import CompileConfig

    torch._logging.set_logs(perf_hints=True)
    out = res.setdefault("generate", {})
    new = 64
    for variant in ("bf16", "w4"):
        torch._dynamo.reset()
        counters.clear()
        m = base if variant == "bf16" else copy.deepcopy(base)
        apply_variant(m, variant)
        enable_fast_generate(m, enabled=False)  # transformers' own loop (quantize() routes generate to Generator)
        prompt = torch.randint(0, m.config.vocab_size, (1, 128), device="cuda")
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                  pad_token_id=0, compile_config=CompileConfig(fullgraph=True))
        row = {}
        try:
            t = time.perf_counter()
            m.generate(prompt, **kw)
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t
            times = []
            for _ in range(3):
                t = time.perf_counter()
                m.generate(prompt, **kw)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            row["ms_per_token"] = min(times) / new * 1e3
            row["counters_inductor"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k.lower()}
            row["counters_all_keys"] = sorted({f"{a}.{b}" for a in counters for b in counters[a]})[:60]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                m.generate(prompt, **kw)
                torch.cuda.synchronize()
            calls = Counter()
            cpu_self = defaultdict(float)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CPU:
                    if e.name.startswith("cuda") or e.name.startswith("cu"):
                        calls[e.name] += 1
                    cpu_self[e.name] += e.self_cpu_time_total
            row["launch_calls_per_token"] = {k: v / new for k, v in calls.most_common(8)}
            row["cpu_self_top_us_per_token"] = [[k[:80], round(v / new, 1)]
                                                for k, v in sorted(cpu_self.items(), key=lambda kv: -kv[1])[:25]]
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:400]
            log(traceback.format_exc()[-2000:])
        out[variant] = row
        log("generate", variant, json.dumps(row)[:3000])
        if variant != "bf16":
            del m
        torch.cuda.empty_cache()
    torch._logging.set_logs(perf_hints=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder (default: $OUT/quant, else benchmarks/results/quant)")
    args = ap.parse_args()
    path = Path(args.out or out_dir("quant")) / "decode_diag.json"
    res = environment("cuda")
    base = build("7b", torch.device("cuda"))
    for section in (attention_section, generate_section):
        try:
            section(base, res)
        except Exception as e:  # noqa: BLE001
            res.setdefault("errors", []).append(repr(e)[:400])
            log(traceback.format_exc()[-2000:])
        write_json(path, res)
    log("wrote", path)


if __name__ == "__main__":
    main()
