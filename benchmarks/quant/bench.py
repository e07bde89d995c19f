"""Weight quantization on the GPU: bf16 vs ours (w8a8, w8, w4) vs torchao, in ONE harness.

Every variant runs through the same helper, ``openautoglm.generation.generator.Generator``: a static KV cache, the
decoder layer compiled once (``torch.compile(fullgraph=True)``) and the whole decode step captured in one
CUDA graph, prompt 128, 256 new tokens, batch 1 and 8; prefill of 2048 tokens through the same compiled
layers; weight bytes and peak GPU memory; achieved weight-read bandwidth at batch 1 vs a device-to-device
copy measured in the same run. Models: random-weight Llama-2-7B-shaped and TinyLlama-1.1B-shaped
``LlamaConfig`` s built directly in bf16 on the GPU. Also: kernel-level timings on 7B layer shapes and
``model.generate(..., cache_implementation="static")`` (transformers' own compile, fullgraph) of bf16 and
our quantized models.

    python -m benchmarks.quant.bench                 # GPU, writes benchmarks/results/quant/bench.json
    python -m benchmarks.quant.bench --smoke         # CPU, tiny shapes, checks the script runs
    python -m benchmarks.quant.bench --quality       # CPU: perplexity of the bundled model per scheme
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from benchmarks._harness import T0, copy_gbps, environment, log, median_s, out_dir, sync, time_us, write_json
from benchmarks.quant.bench_lib import build, plot, summarize
from openautoglm.generation.generator import Generator
from openautoglm.memory.estimate import model_bytes
from openautoglm.quant import QuantConfig, quantize

OURS = {"w8a8": "auto", "w8": "w8", "w4": "w4"}


def apply_variant(model: nn.Module, variant: str) -> str:
    """Quantize in place; returns the concrete scheme name."""
    if variant == "bf16":
        return "bf16"
    base, _, kernel = variant.partition(":")
    if base in OURS:
        from openautoglm.quant import DynamicQuantizer

        if base == "w8a8" and not kernel:
            DynamicQuantizer.quantize(model, bits=8)
        else:
            scheme = "w8a8-fp8" if base == "w8a8" and kernel == "triton" else base
            quantize(model, QuantConfig(scheme=scheme, kernel=kernel or "auto"))
        return model.quant_result.config.scheme
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8WeightOnlyConfig, PerRow, quantize_)

    cfg = {
        "ao-int4wo": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
        "ao-int8wo": lambda: Int8WeightOnlyConfig(),
        "ao-fp8dq": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }[variant]()
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)
    return variant


def decode_tps(gen: Generator, batch, prompt_len, new, dev, vocab) -> dict:
    g = torch.Generator(device=dev).manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=dev, generator=g)
    first = gen.generate(prompt, new)
    runs = [gen.generate(prompt, new) for _ in range(2)]
    tps = sorted(r.tokens_per_s for r in runs)[-1]
    return {"tokens_per_s": tps, "ms_per_step": 1e3 * batch / tps, "first_call_compile_s": first.compile_s,
            "prefill_ms": 1e3 * runs[-1].prefill_s, "same_tokens_every_run": all(torch.equal(r.tokens, first.tokens) for r in runs)}


def prefill_ms(gen: Generator, tokens, dev, vocab) -> float:
    ids = torch.randint(0, vocab, (1, tokens), device=dev)
    gen.generate(ids, 1)  # compiles the prefill graph for this length
    return 1e3 * sorted(gen.generate(ids, 1).prefill_s for _ in range(3))[1]


def kernel_bench(dev) -> dict:
    """Per-layer timings at 7B shapes: bf16 vs our Triton kernels vs tinygemm (int4) at M=1 and 8."""
    from openautoglm.quant.linear import LINEAR_CLASSES

    out = {}
    K, N = (4096, 11008) if dev.type == "cuda" else (256, 512)
    lin = nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    mods = {s: LINEAR_CLASSES[s].from_linear(lin, QuantConfig(scheme=s)) for s in ("w4", "w8", "w8a8-fp8")}
    reps = 10 if dev.type == "cuda" else 2
    for M in (1, 8, 2048):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = lin(x).float()
        row = {"bf16_us": time_us([lambda: lin(x)], dev, reps)}
        for s, m in mods.items():
            try:
                y = m(x).float()
                row[f"{s}_us"] = time_us([lambda: m(x)], dev, reps)
                row[f"{s}_relerr"] = float((y - ref).norm() / ref.norm())
            except Exception as e:  # noqa: BLE001
                row[f"{s}_error"] = repr(e)[-300:]
        if dev.type == "cuda" and hasattr(torch, "_weight_int4pack_mm"):
            try:
                m4 = mods["w4"]
                from openautoglm.quant.math import unpack_int4

                from openautoglm.quant.kernels import unpack_zero

                q = unpack_int4(m4.qweight).to(torch.int32)
                packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
                zc = unpack_zero(m4.zero_rows()).to(torch.bfloat16)
                sr = m4.scale_rows()
                sz = torch.stack([sr.t(), ((8 - zc) * sr).t()], -1).contiguous().to(torch.bfloat16)
                yt = torch._weight_int4pack_mm(x, packed, 128, sz).float()
                row["tinygemm_us"] = time_us([lambda: torch._weight_int4pack_mm(x, packed, 128, sz)], dev, reps)
                row["tinygemm_relerr"] = float((yt - ref).norm() / ref.norm())
            except Exception as e:  # noqa: BLE001
                row["tinygemm_error"] = repr(e)[:200]
        out[f"M={M}"] = row
        log("kernels", M, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return out


def compile_check(dev) -> dict:
    """``torch.compile(fullgraph=True)`` of each quantized Linear at decode and prefill sizes: no graph
    breaks allowed (fullgraph raises on one); output compared with the eager module."""
    from openautoglm.quant.linear import LINEAR_CLASSES

    out = {}
    lin = nn.Linear(512, 1024, bias=False, device=dev, dtype=torch.bfloat16)
    for s in ("w8a8", "w8a8-fp8", "w8", "w4"):
        m = LINEAR_CLASSES[s].from_linear(lin, QuantConfig(scheme=s))
        try:
            torch._dynamo.reset()
            cm = torch.compile(m, fullgraph=True)
            errs = []
            for M in (1, 64):
                x = torch.randn(2, M, 512, device=dev, dtype=torch.bfloat16)
                a, b = m(x).float(), cm(x).float()
                errs.append(float((a - b).norm() / a.norm()))
            out[s] = {"fullgraph": True, "relerr_vs_eager": max(errs)}
        except Exception as e:  # noqa: BLE001
            out[s] = {"fullgraph": False, "error": repr(e)[:300]}
    log("compile check", out)
    return out


def run_variant(shape, variant, dev, args, res_model) -> dict:
    r = {"variant": variant}
    torch._dynamo.reset()
    model = build(shape, dev)
    vocab = model.config.vocab_size
    r["scheme"] = apply_variant(model, variant)
    sync()
    r["weight_bytes"] = model_bytes(model)
    r["read_bytes_per_token"] = r["weight_bytes"] - model.get_input_embeddings().weight.numel() * 2
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = Generator(model)
    for b in args.batches:
        if b > 1 and variant.startswith("ao-") and args.skip_ao_batch8:
            continue
        try:
            r[f"decode_b{b}"] = decode_tps(gen, b, args.prompt, args.new, dev, vocab)
            log(shape, variant, f"batch {b}", r[f"decode_b{b}"])
        except Exception as e:  # noqa: BLE001 - record and go on with the other figures
            r[f"decode_b{b}"] = {"error": repr(e)[:300]}
            log(shape, variant, "decode failed", traceback.format_exc()[-800:])
    try:
        r["prefill_ms"] = prefill_ms(gen, args.prefill, dev, vocab)
    except Exception as e:  # noqa: BLE001
        r["prefill_ms"] = None
        r["prefill_error"] = repr(e)[:300]
        log(shape, variant, "prefill failed", traceback.format_exc()[-800:])
    del gen
    # logits of the first decode position vs bf16 (same seed -> same float weights and prompt)
    g = torch.Generator(device=dev).manual_seed(7)
    ids = torch.randint(0, vocab, (1, 64), device=dev, generator=g)
    with torch.no_grad():
        logits = model(ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    if variant == "bf16":
        res_model["_ref_logits"] = logits
    elif "_ref_logits" in res_model:
        r["logits_cosine_vs_bf16"] = float(torch.nn.functional.cosine_similarity(logits, res_model["_ref_logits"], 0))
    if dev.type == "cuda":
        r["peak_bytes"] = torch.cuda.max_memory_allocated()
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


def generate_bench(shape, variant, dev, args) -> dict:
    """``model.generate(..., cache_implementation="static")`` (transformers compiles the forward; fullgraph=True
    so a graph break would fail the row instead of hiding in the figure)."""
    from transformers import CompileConfig

    r = {"variant": variant}
    torch._dynamo.reset()
    model = build(shape, dev)
    apply_variant(model, variant)
    from openautoglm.generation import enable_fast_generate

    enable_fast_generate(model, enabled=False)  # transformers' own loop (quantize() routes generate to Generator)
    vocab = model.config.vocab_size
    try:
        prompt = torch.randint(0, vocab, (1, args.prompt), device=dev)
        kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                  cache_implementation="static", pad_token_id=0, compile_config=CompileConfig(fullgraph=True))
        t0 = time.perf_counter()
        try:
            model.generate(prompt, **kw)
            r["fullgraph"] = True
        except Exception as e:  # noqa: BLE001 - a graph break somewhere: record it, time the default compile
            r["fullgraph"], r["fullgraph_error"] = False, repr(e)[:300]
            log(shape, variant, "fullgraph generate failed", repr(e)[:300])
            torch._dynamo.reset()
            kw.pop("compile_config")
            model.generate(prompt, **kw)
        sync()
        r["first_call_s"] = time.perf_counter() - t0
        t = median_s(lambda: model.generate(prompt, **kw), 3, 0)
        r["tokens_per_s"] = args.new / t
        log(shape, variant, "generate", r)
    except Exception as e:  # noqa: BLE001
        r["error"] = repr(e)[:300]
        log(shape, variant, "generate failed", traceback.format_exc()[-800:])
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


def quality(args) -> None:
    """Held-out perplexity of the bundled model: float weights vs each scheme (CPU; the CPU w8a8 path).

    The checkpoint's bf16 weights are loaded as float32 (exact) so the CPU computes in float32; each
    scheme quantizes those same weights. Static calibration reads the END of the held-out text, the
    perplexity window its start (no overlap).
    """
    from openautoglm import AutoModelForCausalLM, AutoTokenizer
    from openautoglm.evaluate import perplexity
    from openautoglm.quant import StaticQuantizer

    tok = AutoTokenizer.from_pretrained("open-autoglm-base")
    rows = []
    for s in ["float", "w8a8", "w8a8-fp8", "w8", "w4", "static", "static-percentile"]:
        m = AutoModelForCausalLM.from_pretrained("open-autoglm-base", dtype="float32")
        t = time.perf_counter()
        if s.startswith("static"):
            StaticQuantizer(observer="percentile" if s.endswith("percentile") else "minmax").quantize(m, tokenizer=tok)
        elif s != "float":
            quantize(m, QuantConfig(scheme=s))
        r = perplexity(m, tok, max_tokens=args.quality_tokens, seq_len=512, batch_size=4)
        rows.append({"scheme": s, "perplexity": r.perplexity, "tokens": r.tokens, "weight_bytes": model_bytes(m),
                     "seconds": time.perf_counter() - t})
        log("quality", rows[-1])
    base = rows[0]["perplexity"]
    for r in rows:
        r["vs_float_pct"] = 100 * (r["perplexity"] / base - 1)
    res = {**environment("cpu"), "model": "open-autoglm-base (bf16 weights, float32 compute)", "seq_len": 512,
           "rows": rows}
    path = write_json(Path(args.out or out_dir("quant")) / "bench_quality.json", res)
    print("wrote", path)
    for r in rows:
        print(f"{r['scheme']:18} ppl {r['perplexity']:8.4f}  {r['vs_float_pct']:+6.2f}%  {r['weight_bytes'] / 2**20:7.2f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--models", default="7b,1b")
    ap.add_argument("--variants", default="bf16,w4,w8,w8a8,ao-int4wo,ao-int8wo,ao-fp8dq")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--generate", default="bf16,w4,w8", help="variants also timed through model.generate")
    ap.add_argument("--generate-models", default="7b")
    ap.add_argument("--skip-ao-batch8", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip what would start after this many seconds")
    ap.add_argument("--out", default=None, help="folder (default: $OUT/quant, else benchmarks/results/quant)")
    ap.add_argument("--tuned", default=None, help="a kernels_gpu.json whose best launch configs to use")
    ap.add_argument("--quality", action="store_true", help="CPU: perplexity of the bundled model per scheme")
    ap.add_argument("--quality-tokens", type=int, default=32768)
    args = ap.parse_args()
    if args.quality:
        torch.set_num_threads(2)
        return quality(args)
    if args.smoke:
        args.models, args.prompt, args.new, args.prefill = "smoke", 8, 8, 64
        args.variants = ",".join(v for v in args.variants.split(",") if not v.startswith("ao-"))
    if args.tuned and Path(args.tuned).exists():
        from openautoglm.quant.kernels import ops

        tuned = json.loads(Path(args.tuned).read_text())["tuned"]
        ops.GEMV_TUNED.update({tuple(int(v) for v in k.split(",")): c for k, c in tuned.items()})
        log("tuned GEMV configs loaded:", len(tuned))
    args.batches = [int(b) for b in args.batches.split(",")]
    args.generate = [v for v in args.generate.split(",") if v]
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    env = environment(dev)
    if env["torchao"] is None:
        args.variants = ",".join(v for v in args.variants.split(",") if not v.startswith("ao-"))
    res = {**env,
           "harness": "openautoglm.generation.generator.Generator: static KV cache, decoder layer compiled once (fullgraph), "
                      "whole decode step in one CUDA graph; prefill through the same compiled layers",
           "prompt": args.prompt, "new_tokens": args.new, "prefill_tokens": args.prefill, "models": {}}
    res["copy_GBps"] = copy_gbps(dev)
    log("copy bandwidth GB/s", res["copy_GBps"])
    if not args.no_kernels:
        res["kernels_7b_mlp_up"] = kernel_bench(dev)
    res["compile_check"] = compile_check(dev)
    out_path = Path(args.out or out_dir("quant", args.smoke)) / ("bench_smoke.json" if args.smoke else "bench.json")
    for shape in args.models.split(","):
        res_model: dict = {}
        rows = []
        for variant in args.variants.split(","):
            if time.time() - T0 > args.budget_s:
                rows.append({"variant": variant, "skipped": "time budget"})
                log("skip", shape, variant, "(time budget)")
                continue
            try:
                rows.append(run_variant(shape, variant, dev, args, res_model))
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": variant, "error": repr(e)[:300]})
                log(shape, variant, "FAILED", traceback.format_exc()[-1500:])
            if variant in OURS and "tokens_per_s" not in rows[-1].get("decode_b1", {}) and dev.type == "cuda":
                try:  # the Triton path failed: measure the torch-op path so the row is not empty, and say so
                    rows.append(run_variant(shape, variant + ":torch", dev, args, res_model))
                except Exception as e:  # noqa: BLE001
                    rows.append({"variant": variant + ":torch", "error": repr(e)[:300]})
            _write(res, shape, rows, out_path)
        _write(res, shape, rows, out_path)
        if shape in args.generate_models or args.smoke:
            for v in args.generate:
                if time.time() - T0 > args.budget_s + 30:
                    res.setdefault("generate", {})[f"{shape}/{v}"] = {"skipped": "time budget"}
                    continue
                res.setdefault("generate", {})[f"{shape}/{v}"] = generate_bench(shape, v, dev, args)
                _write(res, shape, rows, out_path)
    summarize(res)


def _write(res, shape, rows, path):
    base = next((r for r in rows if r.get("variant") == "bf16" and "weight_bytes" in r), None)
    for r in rows:
        if base and "weight_bytes" in r:
            r["weight_ratio_vs_bf16"] = r["weight_bytes"] / base["weight_bytes"]
            for k in ("decode_b1", "decode_b8"):
                if "tokens_per_s" in r.get(k, {}) and "tokens_per_s" in base.get(k, {}):
                    r[k]["speedup_vs_bf16"] = r[k]["tokens_per_s"] / base[k]["tokens_per_s"]
            if r.get("prefill_ms") and base.get("prefill_ms"):
                r["prefill_speedup_vs_bf16"] = base["prefill_ms"] / r["prefill_ms"]
        if "tokens_per_s" in r.get("decode_b1", {}):
            r["decode_b1"]["achieved_GBps"] = r["weight_bytes"] * r["decode_b1"]["tokens_per_s"] / 1e9
            r["decode_b1"]["fraction_of_copy"] = r["decode_b1"]["achieved_GBps"] / res["copy_GBps"]
            r["decode_b1"]["read_fraction_of_copy"] = (r["read_bytes_per_token"] * r["decode_b1"]["tokens_per_s"]
                                                       / 1e9 / res["copy_GBps"])
    gens = res.get("generate", {})
    for k, g in gens.items():
        b = gens.get(k.split("/")[0] + "/bf16", {})
        if "tokens_per_s" in g and "tokens_per_s" in b:
            g["speedup_vs_bf16_generate"] = g["tokens_per_s"] / b["tokens_per_s"]
    res["models"][shape] = rows
    write_json(path, res)
    plot(res, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
