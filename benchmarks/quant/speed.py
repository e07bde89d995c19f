"""Weight-quantization speed on the GPU: ONE script, ONE run, every figure (and its bf16 baseline) from that run.

Sections, in priority order, each started only if its estimated time still fits the budget (``--budget-s``;
skipped sections are listed in the JSON), the JSON rewritten after every row:

1. per-layer kernels (:mod:`benchmarks.quant.tune`): tune (the formats of ``--retune``; the others timed with the shipped
   table's configuration) and time our decode kernels against cuBLAS bf16 and tinygemm at M = 1 and 8 on 7B
   and 1B Llama shapes, GB/s against a device copy measured in the same run; prefill layers at 2048 tokens,
   and q/k/v, gate/up dequantized into one matrix + one GEMM vs one per layer. The tuned launch
   configurations are used by everything after.
2. 7B-shaped random Llama through ``openautoglm.generation.generator.Generator`` (static cache, compiled layer, CUDA
   graph): bf16, w4, w8, w8a8 (fp8 on the H100): decode batch 1 and 8 (prompt 128, 256 new tokens),
   prefill 2048 (GPU time by CUDA events, w4/w8 also without the q/k/v, gate/up prefill fusion, a
   torch.profiler breakdown by kernel kind), weight bytes, logits cosine vs bf16; a profile of one w4 decode step.
3. ``model.generate(..., cache_implementation="static")`` (transformers compiles the model, fullgraph) for
   bf16, w4 and w8, through transformers' loop and routed to the compiled decode, in the same call.
   Ablation rows (``VARIANT@sdpa``): the decode with ``OPENAUTOGLM_DENSE_DECODE=0`` (masked SDPA instead of our
   decode attention), decode only.
4. torchao 0.17 in the same harness: int4 weight-only (tinygemm), int8 weight-only, fp8 dynamic; each of our
   variants against its matching torchao config (``x_torchao``).
5. the same for the 1B-shaped model (``--shapes 7b`` leaves it out); 6. Nsight Compute metrics of the w4
   decode kernel (one 7B layer).

One device command may not hold every row (torchao's alone take 400+ s): ``--only`` picks plan rows, so a run
can be split over calls, each with its own bf16 row (ratios are taken within one call).

    python -m benchmarks.quant.speed --budget-s 330     # GPU; writes $OUT/quant or benchmarks/results/quant/speed.json
    python -m benchmarks.quant.speed --smoke            # CPU, tiny model (~1 min on 2 cores)
    TRITON_INTERPRET=1 python -m benchmarks.quant.speed --smoke   # the same with the kernel section (~5 min)

Without ``TRITON_INTERPRET=1`` a CPU run records the kernel section's error and times the model rows on the torch
paths; with it every Triton kernel runs in the interpreter.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks._harness import ROOT, T0, copy_gbps, environ, environment, log, out_dir
from benchmarks.quant import tune
from benchmarks.quant.bench_lib import build
from benchmarks.quant.speed_lib import decode_row, generate_row, summarize, write_json

LAYERS = {"7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
          "1b": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)], "smoke": [(512, 256), (256, 512)]}
FUSED = {"7b": [(12288, 4096), (22016, 4096)], "1b": [(2560, 2048), (11264, 2048)], "smoke": [(1024, 256)]}  # qkv, gate+up
GROUPS = {"7b": [((4096, 4096, 4096), 4096), ((11008, 11008), 4096)],  # q/k/v and gate/up read one input
          "1b": [((2048, 256, 256), 2048), ((5632, 5632), 2048)], "smoke": [((512, 256, 256), 256)]}
# (kind, model, variant, decode batches, estimated seconds on the H100), in priority order: the 7B set complete
# (every variant at batch 1 and 8, model.generate of bf16/w4/w8), then the 1B rows. Estimates from the H100 logs
# (results/quant/speed_h100_*_log.txt): 7B rows 25-30 s, model.generate 35-40 s, torchao int4 143 s at batch 1 and 8
# (its compiles and 0.9 s prefills), torchao int8 > 107 s.
PLAN = [("model", "7b", "bf16", (1, 8), 30), ("model", "7b", "w4", (1, 8), 35), ("model", "7b", "w8", (1, 8), 28),
        ("model", "7b", "w8a8", (1, 8), 25), ("gen", "7b", "bf16", (), 60), ("gen", "7b", "w4", (), 60),
        ("gen", "7b", "w8", (), 60), ("model", "7b", "bf16@sdpa", (1,), 12), ("model", "7b", "w4@sdpa", (1,), 12),
        ("model", "7b", "ao-int4wo", (1, 8), 145), ("model", "7b", "ao-int8wo", (1, 8), 130),
        ("model", "7b", "ao-fp8dq", (1, 8), 110),
        ("model", "1b", "bf16", (1, 8), 18), ("model", "1b", "w4", (1, 8), 18), ("model", "1b", "w8", (1, 8), 14),
        ("model", "1b", "w8a8", (1, 8), 14), ("gen", "1b", "bf16", (), 45), ("gen", "1b", "w4", (), 45),
        ("gen", "1b", "w8", (), 45), ("model", "1b", "ao-int4wo", (1, 8), 45),
        ("model", "1b", "ao-int8wo", (1, 8), 45), ("model", "1b", "ao-fp8dq", (1, 8), 40), ("ncu", "7b", "w4", (), 30)]


def fits(res, what: str, est: float, args) -> bool:
    left = args.budget_s - (time.time() - T0)
    if left < est:
        res.setdefault("skipped", []).append(f"{what} (estimated {est:.0f} s, {left:.0f} s left)")
        log("skip", what, f"{left:.0f} s left")
        return False
    return True


def _free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# Ablations: ``VARIANT@SWITCH`` runs VARIANT with one of the decode path's environment switches set (decode only,
# no prefill), so the JSON says what each piece is worth in the same run.
ABLATIONS = {"sdpa": {"OPENAUTOGLM_DENSE_DECODE": "0"}}  # masked SDPA instead of our decode attention


def model_step(res, base, shape, variant, batches, dev, args, out):
    rows = res["models"].setdefault(shape, [])
    saved = _inductor_config()
    m = None
    plain, _, ablate = variant.partition("@")
    try:
        m = base if plain == "bf16" else copy.deepcopy(base)
        with environ(ABLATIONS[ablate] if ablate else {}):
            rows.append(decode_row(m, shape, variant, dev, args, batches, log, prefill=not ablate,
                                   profile=(variant in ("w4", "bf16") and shape != "smoke" and dev.type == "cuda")))
    except Exception as e:  # noqa: BLE001 - record and go on
        rows.append({"variant": variant, "error": repr(e)[:400]})
        log(shape, variant, "FAILED", traceback.format_exc()[-1500:])
    finally:
        _inductor_config(saved)
        del m
        torch._dynamo.reset()
        _free(dev)
    write_json(res, out)


def generate_step(res, base, shape, variant, dev, args, out):
    key = f"{shape}/{variant}"
    m = None
    try:
        m = copy.deepcopy(base)
        res.setdefault("generate", {})[key] = generate_row(m, variant, dev, args, log)
    except Exception as e:  # noqa: BLE001
        res.setdefault("generate", {})[key] = {"error": repr(e)[:400]}
        log("generate", key, "FAILED", traceback.format_exc()[-1500:])
    finally:
        del m
        torch._dynamo.reset()
        _free(dev)
    write_json(res, out)


def _inductor_config(saved: dict | None = None) -> dict:
    """torchao's quantize_ sets inductor options globally (coordinate-descent tuning...): restore after it."""
    import torch._inductor.config as ic

    keys = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul",
            "fx_graph_cache")
    if saved is None:
        return {k: getattr(ic, k) for k in keys if hasattr(ic, k)} | {"_mm": torch.get_float32_matmul_precision()}
    for k, val in saved.items():
        if k == "_mm":
            torch.set_float32_matmul_precision(val)
        else:
            setattr(ic, k, val)
    return saved


def ncu_section(res, dev, args, out):
    if dev.type != "cuda":
        return
    (out / "tuned.json").write_text(json.dumps(res["kernels"]["tuned"]))
    rep = out / "ncu_w4.csv"
    cmd = ["ncu", "--clock-control", "none", "--kernel-name", "regex:decode", "--launch-skip", "3", "--launch-count",
           "2", "--section", "SpeedOfLight", "--section", "SchedulerStats", "--section", "WarpStateStats",
           "--section", "Occupancy", "--section", "LaunchStats", "--csv", "--page", "details",
           sys.executable, "-m", "benchmarks.quant.ncu_target", str(out / "tuned.json")]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           timeout=max(20, args.budget_s - (time.time() - T0)))
        rep.write_text(r.stdout)
        res["ncu"] = {"returncode": r.returncode, "stderr_tail": r.stderr[-600:], "file": rep.name,
                      "metrics": _ncu_pick(r.stdout)}
        log("ncu", res["ncu"]["metrics"])
    except Exception as e:  # noqa: BLE001
        res["ncu"] = {"error": repr(e)[:300]}
    write_json(res, out)


def _ncu_pick(csv_text: str) -> list[dict]:
    import csv
    import io

    want = ("Duration", "Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput", "Issue Slots Busy",
            "No Eligible", "Achieved Occupancy", "Registers Per Thread", "Warp Cycles Per Issued Instruction",
            "Grid Size", "Block Size", "Theoretical Occupancy", "Eligible Warps Per Scheduler")
    out: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(csv_text[csv_text.find('"ID"'):] if '"ID"' in csv_text else "")):
        key = f"{row.get('ID')} {row.get('Kernel Name', '')[:40]}"
        if row.get("Metric Name") in want:
            out.setdefault(key, {})[row["Metric Name"]] = f"{row.get('Metric Value')} {row.get('Metric Unit', '')}".strip()
    return [{"kernel": k, **v} for k, v in out.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--tune-s", type=float, default=45.0)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--out", default=None, help="folder (default: $OUT/quant, else benchmarks/results/quant)")
    ap.add_argument("--only", default="", help="comma-separated plan rows to run, e.g. 'model 7b bf16,model 7b ao-int4wo'")
    ap.add_argument("--shapes", default="7b,1b", help="models to run (rows and per-layer shapes), e.g. '7b'")
    ap.add_argument("--retune", default="8,9", help="decode formats to tune in this run (5 int4 k32, 8 int8, 9 e4m3; "
                                                    "'all'); the others are timed with gemv_tuned.json's configurations")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shapes = ["smoke"] if args.smoke else [x.strip() for x in args.shapes.split(",") if x.strip()]
    if not args.smoke and (not shapes or set(shapes) - {"7b", "1b"}):
        ap.error(f"--shapes takes 7b and/or 1b, got {args.shapes!r}")
    retune = None if args.retune == "all" else {int(v) for v in args.retune.split(",") if v.strip()}
    if args.smoke:
        args.prompt, args.new, args.prefill = 8, 8, 64
    out = Path(args.out or out_dir("quant", args.smoke))
    out.mkdir(parents=True, exist_ok=True)
    res = {**environment(dev),
           "harness": "openautoglm.generation.generator.Generator: static KV cache, one decoder layer compiled (fullgraph), the "
                      "whole decode step in one CUDA graph; prefill through the same compiled layer",
           "prompt": args.prompt, "new_tokens": args.new, "prefill_tokens": args.prefill, "budget_s": args.budget_s,
           "retuned_formats": "all" if retune is None else sorted(retune), "argv": sys.argv[1:],
           "models": {}}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    layer_shapes = [(n, k, ms) for sh in shapes for lst, ms in ((LAYERS[sh], [1, 8]), (FUSED[sh], [1]))
                    for n, k in lst]
    try:
        res["kernels"] = tune.run(dev, dtype, layer_shapes, LAYERS[shapes[0]], args.prefill, args.tune_s, log,
                                        retune=retune, prefill_groups=GROUPS[shapes[0]])
    except Exception as e:  # noqa: BLE001 - the model rows still run, on the heuristic configurations
        log("kernels FAILED", traceback.format_exc()[-1500:])
        res["kernels"] = {"error": repr(e)[:400], "rows": [], "prefill": [], "tuned": {},
                          "copy_GBps": copy_gbps(dev)}
    res["copy_GBps"] = res["kernels"]["copy_GBps"]
    write_json(res, out)
    plan = PLAN
    if args.smoke:  # each (kind, variant) once, on the tiny model
        plan = list({(k, v): (k, "smoke", v, b, 0) for k, _, v, b, _ in PLAN if not v.startswith("ao-")}.values())
    if args.only:
        keep = {r.strip() for r in args.only.split(",")}
        plan = [p for p in plan if f"{p[0]} {p[1]} {p[2]}" in keep]
    bases: dict = {}
    for kind, shape, variant, batches, est in plan:
        if shape not in shapes or (variant.startswith("ao-") and not res["torchao"]):
            continue
        if not fits(res, f"{kind} {shape} {variant}", est, args):
            continue
        res["running"] = f"{kind} {shape} {variant} (started at {time.time() - T0:.0f} s)"  # what a killed run was doing
        write_json(res, out)
        if kind == "ncu":
            ncu_section(res, dev, args, out)
            continue
        if shape not in bases:
            bases.clear()
            _free(dev)
            bases[shape] = build(shape, dev)
        if kind == "model":
            model_step(res, bases[shape], shape, variant, batches, dev, args, out)
        else:
            generate_step(res, bases[shape], shape, variant, dev, args, out)
    res["wall_s"] = time.time() - T0
    res.pop("running", None)
    write_json(res, out, plot=True)
    summarize(res)


if __name__ == "__main__":
    main()
