"""Validate the analytic memory estimator against measured peaks on a GPU.

A grid of random-weight Llama-shaped models (160M, 1B = Llama-3.2-1B shape, 7B = Llama-2-7B shape) x
inference (prefill with a KV cache, last-token logits as ``generate`` does) / training (steps of
``openautoglm.training.loop``'s loop: fused AdamW, pure bf16 or bf16/fp16 autocast with fp32 master weights,
activation checkpointing on/off, gradient accumulation). Each case is estimated from its config alone
(meta device) and measured with ``torch.cuda.max_memory_allocated`` above the bytes allocated before the
model was built (cuBLAS/cuBLASLt workspaces are created by a warm-up first and reported separately).

    python -m benchmarks.memory.bench            # GPU: writes benchmarks/results/memory/bench.json
    python -m benchmarks.memory.bench --smoke    # CPU: tiny shapes, checks the script end to end
    python -m benchmarks.memory.bench --plot     # PNGs from the JSON (estimated vs measured, breakdown)
    python -m benchmarks.memory.bench --group tinyllama --explain --out ...   # only that group of cases, and
                                                 # what is alive at each inference peak (dispatch-level tensor trace)

Two groups of cases: ``grid`` (the shapes above) and ``tinyllama``: a TinyLlama-shaped 1B (22 layers, 32 query /
4 KV heads, MLP 5632, vocab 32000) at batch 8 x 2048 with a Llama-3.2-1B control, a plain user forward without
``logits_to_keep`` (all logits), and a plain user training loop (``torch.optim.AdamW(model.parameters())`` with
torch's defaults: foreach on CUDA) estimated with the default ``optimizer="adamw"`` and with the live optimizer
object.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks._harness import environment, out_dir, write_json

MODELS = {
    "llama-160m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "tinyllama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False),
}
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)


def cases(smoke: bool) -> list[dict]:
    inf = [("llama-160m", 8, 2048), ("llama-1b", 8, 2048), ("llama-7b", 1, 4096), ("llama-7b", 8, 2048)]
    out = [dict(mode="inference", model=m, batch=b, seq_len=s) for m, b, s in inf]
    for m, b, s in (("llama-160m", 8, 1024), ("llama-1b", 4, 1024)):
        for amp in ("none", "bf16"):
            for ck in (False, True):
                out.append(dict(mode="train", model=m, batch=b, seq_len=s, amp=amp, ckpt=ck, accum=1))
    out.append(dict(mode="train", model="llama-1b", batch=4, seq_len=1024, amp="fp16", ckpt=False, accum=2))
    out.append(dict(mode="train", model="llama-1b", batch=2, seq_len=2048, amp="bf16", ckpt=True, accum=2))
    out = [dict(c, group="grid") for c in out]
    out += [dict(group="tinyllama", mode="inference", model="llama-1b", batch=8, seq_len=2048),  # control
            dict(group="tinyllama", mode="inference", model="tinyllama-1b", batch=8, seq_len=2048),
            dict(group="tinyllama", mode="inference", model="tinyllama-1b", batch=8, seq_len=2048, logits="all"),
            dict(group="tinyllama", mode="train", loop="plain", model="tinyllama-1b", batch=4, seq_len=1024, amp="bf16",
                 ckpt=True, accum=1)]
    if smoke:
        out = [dict(c, batch=2, seq_len=64) for c in out[:1] + out[4:6] + out[13:14] + out[-4:]]
    return out


def config_dict(name: str, smoke: bool) -> dict:
    return dict(model_type="llama", max_position_embeddings=4096, rope_theta=10000.0,
                **(SMOKE if smoke else MODELS[name]))


def accelerate_figure(cfg: dict, dtype_bytes: int) -> int:
    """accelerate's ``estimate-memory``: the weights of the model (its largest-dtype size scaled to ``dtype``)."""
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    total, _ = calculate_maximum_sizes(m)
    return int(total * dtype_bytes / 4)


def build(cfg: dict, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measure_inference(model, c: dict, device: str, explain: bool = False) -> tuple[dict, dict | None]:
    """Prefill with a KV cache: last-token logits as ``generate`` does, or (``logits="all"``) a plain user forward
    that returns every position's logits. ``explain`` repeats it under a dispatch-level tensor trace and returns
    what was alive at its peak."""
    x = torch.randint(0, model.config.vocab_size, (c["batch"], c["seq_len"]), device=device)
    kw = {} if c.get("logits") == "all" else {"logits_to_keep": 1}
    reset(device)
    with torch.inference_mode():
        out = model(input_ids=x, use_cache=True, **kw)
    p = peak(device)
    del out
    trace = None
    if explain:
        from openautoglm.memory import TensorTracker

        weights = list(model.parameters()) + list(model.buffers())
        with torch.inference_mode(), TensorTracker(ignore=weights, explain=True) as tr:
            out = model(input_ids=x, use_cache=True, **kw)
        del out
        trace = {"tracked_peak_above_weights": tr.peak, "peak_op": tr.peak_op, "alive_at_peak": tr.peak_summary(16)}
    del x
    return {"prefill": p}, trace


def measure_train_plain(model, c: dict, device: str) -> tuple[dict, torch.optim.Optimizer]:
    """A plain user loop: ``torch.optim.AdamW(model.parameters())`` (torch's default implementation), bf16
    autocast over fp32 parameters, transformers' activation checkpointing; the second step is reported."""
    from openautoglm import _hf

    if c["ckpt"]:
        _hf.enable_activation_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    p = 0
    for _ in range(2):
        x = torch.randint(0, model.config.vocab_size, (c["batch"], c["seq_len"]), device=device)
        reset(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=c["amp"] == "bf16"):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        p = peak(device)
        del loss, x
    return {"train step": p}, opt


def measure_train(model, c: dict, device: str) -> dict:
    from openautoglm.training.loop import TrainConfig, autocast_ctx, batch_at, build_optimizer, prepare_model

    cfg = TrainConfig(steps=2, micro_batch=c["batch"], seq_len=c["seq_len"], amp=c["amp"], grad_checkpointing=c["ckpt"],
                      grad_accum=c["accum"], progress=False)
    prepare_model(model, cfg)
    opt = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device, enabled=c["amp"] == "fp16")
    ids = torch.randint(0, model.config.vocab_size, (200_000,))
    dev = torch.device(device)
    phases: dict[str, int] = {}
    for step in range(2):  # step 0 allocates the optimizer states; step 1 is the steady state that is reported
        fwd = bwd = 0
        for micro in range(cfg.grad_accum):
            x = batch_at(ids, step, micro, cfg).to(dev)
            reset(device)
            with autocast_ctx(dev, cfg.amp):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            fwd = max(fwd, peak(device))
            reset(device)
            scaler.scale(loss / cfg.grad_accum).backward()
            bwd = max(bwd, peak(device))
            del loss, x
        reset(device)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        phases = {"forward": fwd, "backward": bwd, "optimizer step": peak(device)}
    del opt
    return phases


def warm_up(device: str) -> dict:
    """Create the cuBLAS/cuBLASLt workspaces (forward and autograd threads) and check flash SDPA with GQA."""
    info = {}
    if device != "cuda":
        return info
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        lin = torch.nn.Linear(256, 256, device=device, dtype=dt)
        x = torch.randn(64, 256, device=device, dtype=dt, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dt == torch.float32):
            y = lin(x).float().sum()
        y.backward()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 8, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, 2, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).sum().backward()
        info["flash_gqa"] = True
    except RuntimeError as e:
        info["flash_gqa"] = f"no: {str(e).splitlines()[0][:120]}"
    del lin, x, y, q, kv
    gc.collect()
    torch.cuda.synchronize()
    info["library_workspace_bytes"] = torch.cuda.memory_allocated()
    return info


def _optimizer(c: dict) -> str:
    """Our loop (openautoglm.training.loop) builds the fused AdamW; the plain loop gets torch's default ("adamw")."""
    return "adamw" if c.get("loop") == "plain" else "adamw_fused"


def run(smoke: bool, out_path: Path, group: str | None = None, explain: bool = False) -> dict:
    from openautoglm.memory import estimate_memory

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    doc = {**environment(device), **warm_up(device), "smoke": smoke, "group": group, "cases": []}
    t_all = time.perf_counter()
    model, model_key = None, None
    for c in cases(smoke):
        if group and c["group"] != group:
            continue
        t0 = time.perf_counter()
        cfg = config_dict(c["model"], smoke)
        train = c["mode"] == "train"
        dtype = torch.float32 if train and c["amp"] != "none" else torch.bfloat16
        est = estimate_memory(cfg, mode=c["mode"], batch=c["batch"], seq_len=c["seq_len"], dtype=dtype,
                              amp=c.get("amp"), grad_checkpointing=c.get("ckpt", False), grad_accum=c.get("accum", 1),
                              logits=c.get("logits"), device=device, optimizer=_optimizer(c))
        key = (c["model"], dtype, train)
        if model is None or key != model_key or train:
            model = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            start = torch.cuda.memory_allocated() if device == "cuda" else 0
            model = build(cfg, dtype, device)
            model_key = key
        trace, extra = None, {}
        if train and c.get("loop") == "plain":
            phases, opt = measure_train_plain(model, c, device)
            by_obj = estimate_memory(cfg, mode="train", batch=c["batch"], seq_len=c["seq_len"], dtype=dtype,
                                     amp=c["amp"], grad_checkpointing=c["ckpt"], optimizer=opt)
            extra = {"estimated_from_optimizer_object": by_obj.total, "optimizer": est.settings["optimizer"],
                     "estimated_adamw_fused": estimate_memory(cfg, mode="train", batch=c["batch"], seq_len=c["seq_len"],
                                                              dtype=dtype, amp=c["amp"], grad_checkpointing=c["ckpt"],
                                                              optimizer="adamw_fused").total}
            del opt
        elif train:
            phases = measure_train(model, c, device)
        else:
            phases, trace = measure_inference(model, c, device, explain)
        measured = max(phases.values()) - start
        row = {**c, "dtype": str(dtype).replace("torch.", ""), "estimated": est.total, "measured": measured,
               "error_pct": 100 * (est.total / measured - 1) if measured else None,
               "measured_phases": {k: v - start for k, v in phases.items()}, "estimate_phase": est.phase,
               "estimate_phases": est.phases, "terms": est.terms, "params": est.settings["params"],
               "accelerate_weights": accelerate_figure(cfg, 2 if dtype == torch.bfloat16 else 4),
               "baseline_bytes": start, "seconds": round(time.perf_counter() - t0, 2), **extra}
        if trace is not None:
            row["trace"] = trace
        if train:
            model = None  # training mutated it (fp32 cast, checkpointing); rebuild next time
        doc["cases"].append(row)
        err = f"{row['error_pct']:+6.2f}%" if row["error_pct"] is not None else "  n/a "
        print(f"{c['mode']:9} {c['model']:12} b{c['batch']} s{c['seq_len']} amp={c.get('amp', '-'):4} "
              f"ckpt={int(c.get('ckpt', False))} acc={c.get('accum', 1)}  est {est.total / 2**30:7.3f} GiB  "
              f"meas {measured / 2**30:7.3f} GiB  {err}  ({row['seconds']} s)", flush=True)
        summarize(doc)
        write_json(out_path, doc)
    doc["seconds_total"] = round(time.perf_counter() - t_all, 1)
    summarize(doc)
    write_json(out_path, doc)
    return doc


def summarize(doc: dict) -> None:
    errs = [abs(c["error_pct"]) for c in doc["cases"] if c["error_pct"] is not None]
    if errs:
        doc["summary"] = {"cases": len(errs), "max_abs_error_pct": max(errs), "median_abs_error_pct": statistics.median(errs),
                          "within_5pct": sum(e <= 5 for e in errs)}


def recompute(path: Path) -> dict:
    """Re-estimate every case of a results file with the current estimator (measured figures unchanged)."""
    from openautoglm.memory import estimate_memory

    doc = json.loads(path.read_text())
    for c in doc["cases"]:
        est = estimate_memory(config_dict(c["model"], doc.get("smoke", False)), mode=c["mode"], batch=c["batch"],
                              seq_len=c["seq_len"], dtype=getattr(torch, c["dtype"]), amp=c.get("amp"),
                              grad_checkpointing=c.get("ckpt", False), grad_accum=c.get("accum", 1),
                              logits=c.get("logits"), optimizer=_optimizer(c),
                              device="cpu" if doc["device"] == "cpu" else "cuda")
        c.setdefault("estimated_at_run", c["estimated"])
        c.update(estimated=est.total, terms=est.terms, estimate_phase=est.phase, estimate_phases=est.phases,
                 error_pct=100 * (est.total / c["measured"] - 1))
    doc["estimates_recomputed"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summarize(doc)
    write_json(path, doc)
    return doc


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(path.read_text())
    cs = doc["cases"]
    print(f"{'case':58} {'measured':>9} {'ours':>9} {'error':>7} {'accelerate (weights)':>21}")
    for c in cs:
        name = f"{c['mode']} {c['model']} b{c['batch']}x{c['seq_len']}" + (" plain" if c.get("loop") else "") + (
            " all-logits" if c.get("logits") == "all" else "") + (
            f" amp={c['amp']} ckpt={int(c['ckpt'])} acc={c['accum']}" if c["mode"] == "train" else "")
        print(f"{name:58} {c['measured'] / 2**30:8.3f}G {c['estimated'] / 2**30:8.3f}G {c['error_pct']:+6.2f}% "
              f"{c['accelerate_weights'] / 2**30:20.3f}G")
    labels = [f"{c['model']} {c['mode'][:5]} b{c['batch']}x{c['seq_len']}"
              + (f" {c['amp']}{' ckpt' if c['ckpt'] else ''}{' acc' + str(c['accum']) if c['accum'] > 1 else ''}"
                 if c["mode"] == "train" else "") for c in cs]
    fig, ax = plt.subplots(figsize=(7, 6))
    m = [c["measured"] / 2**30 for c in cs]
    e = [c["estimated"] / 2**30 for c in cs]
    ax.scatter(m, e, c=["tab:blue" if c["mode"] == "train" else "tab:orange" for c in cs])
    hi = max(m + e) * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="estimate = measured")
    ax.fill_between([0, hi], [0, hi * 0.95], [0, hi * 1.05], color="grey", alpha=0.2, label="+/-5%")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("measured peak (GiB, torch.cuda.max_memory_allocated)"), ax.set_ylabel("estimated peak (GiB)")
    s = doc.get("summary", {})
    ax.set_title(f"{doc['device']}: max |err| {s.get('max_abs_error_pct', 0):.2f}%, median {s.get('median_abs_error_pct', 0):.2f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_name(f"{path.stem}_scatter.png"), dpi=120)
    terms = ["weights", "master_weights", "gradients", "optimizer_states", "activations", "kv_cache", "logits", "workspace"]
    fig, ax = plt.subplots(figsize=(11, 6))
    bottom = [0.0] * len(cs)
    for t in terms:
        v = [c["terms"].get(t, 0) / 2**30 for c in cs]
        if any(v):
            ax.bar(range(len(cs)), v, bottom=bottom, label=t.replace("_", " "))
            bottom = [b + x for b, x in zip(bottom, v)]
    ax.scatter(range(len(cs)), m, color="k", marker="_", s=400, zorder=3, label="measured peak")
    ax.set_xticks(range(len(cs)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("GiB at the estimated peak")
    ax.set_title("estimated breakdown at the peak vs measured peak")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_name(f"{path.stem}_breakdown.png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (script check)")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default: bench.json in $OUT/memory, else in "
                    "benchmarks/results/memory)")
    ap.add_argument("--plot", action="store_true", help="only draw the PNGs from the JSON")
    ap.add_argument("--recompute", action="store_true", help="re-estimate the cases of the JSON")
    ap.add_argument("--group", choices=["grid", "tinyllama"], default=None, help="only this group of cases")
    ap.add_argument("--explain", action="store_true", help="trace what is alive at each inference peak")
    a = ap.parse_args()
    out = a.out or out_dir("memory", a.smoke) / ("bench_smoke.json" if a.smoke else "bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.recompute:
        recompute(out)
    if a.plot or a.recompute:
        plot(out)
        return
    doc = run(a.smoke, out, a.group, a.explain)
    print(json.dumps(doc.get("summary", {})))


if __name__ == "__main__":
    main()
