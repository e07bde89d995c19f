"""``openautoglm estimate | plan-train | train``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ._app import app, console
from ._common import check_json_out, fmt_bytes, parse_bytes, pick_device, read_text_file, table


def _accelerate_weights(model: str, dtype_b: int) -> int | None:
    """accelerate's ``estimate-memory`` figure (weights only, tied tensors counted as it counts them)."""
    try:
        from accelerate.utils import calculate_maximum_sizes

        from .. import hub

        total, _ = calculate_maximum_sizes(hub.empty_model(model, dtype="float32"))
        return int(total * dtype_b / 4)
    except Exception:  # noqa: BLE001 - only a comparison figure; configs/dicts without a folder have none
        return None


@app.command()
def estimate(
    model: str = typer.Argument(..., help="Shipped model name, model folder, or a config.json file."),
    mode: str = typer.Option("inference", help="inference or train"),
    batch: int = typer.Option(1, min=1, help="Sequences per forward (the micro-batch in training)."),
    seq: int = typer.Option(2048, "--seq", "--seq-len", min=1, help="Tokens per sequence (context)."),
    dtype: str = typer.Option(None, help="Parameter dtype: bf16, fp16, fp32 (default: the checkpoint's)."),
    kv_dtype: str = typer.Option(None, "--kv-dtype", help="KV cache: bf16, fp16, fp32, fp8, int8, int4, int2."),
    quant: str = typer.Option(None, "--quant", help="Weight quantization: w8, w4 (group 128)."),
    optimizer: str = typer.Option("adamw", help="adamw (torch's default on --device: foreach on CUDA), adamw_fused, "
                                  "adamw_foreach, adamw_forloop, sgd, adafactor"),
    device: str = typer.Option("cuda", help="Where training runs (decides torch's default optimizer code)."),
    amp: str = typer.Option("none", help="bf16 or fp16 autocast with fp32 master weights, or none"),
    ckpt: bool = typer.Option(False, "--ckpt/--no-ckpt", help="Activation checkpointing."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel degree (per-GPU figure)."),
    kv_shared: int = typer.Option(0, "--kv-shared", min=0, help="Layers whose KV is freed by cross-layer sharing."),
    logits: str = typer.Option(None, "--logits", help="inference: last (generate's prefill, default) or all "
                               "(a plain model(ids) forward returns every position's logits)"),
    json_out: Path = typer.Option(None, "--json", help="Also write the estimate to this JSON file."),
) -> None:
    """Analytic peak memory of inference or of one training step, from the config alone (no weights read)."""
    from ..memory.estimate import dtype_bytes, estimate_memory

    check_json_out(json_out)
    est = estimate_memory(model, mode=mode, batch=batch, seq_len=seq, dtype=dtype, kv_dtype=kv_dtype, quantization=quant,
                          optimizer=optimizer, amp=amp, grad_checkpointing=ckpt, grad_accum=grad_accum, tp_degree=tp,
                          kv_shared_layers=kv_shared, device=device, logits=logits)
    s = est.settings
    title = (f"{model}: {mode}, batch {batch} x {seq} tokens, {s['dtype']}"
             + (f", amp {s['amp']}, {s['optimizer']}, ckpt {'on' if ckpt else 'off'}, accum {grad_accum}" if mode == "train" else
                f", KV {s['kv_dtype']}" + (f", weights {quant}" if quant else "")))
    console.print(est.table(title))
    for n in est.notes:
        console.print(f"note: {n}")
    if not quant and tp == 1:
        acc = _accelerate_weights(model, 4 if s["amp"] != "none" and mode == "train" else int(dtype_bytes(s["dtype"])))
        if acc is not None:
            console.print(f"accelerate estimate-memory (weights only): {fmt_bytes(acc)}; ours, total at peak: "
                          f"{fmt_bytes(est.total)}")
    if json_out:
        json_out.write_text(json.dumps(est.to_dict(), indent=2, default=str))


@app.command("plan-train")
def plan_train(
    model: str = typer.Argument(..., help="Shipped model name, model folder, or a config.json file."),
    budget: str = typer.Option("40GiB", help="Memory budget per GPU, e.g. 24GiB."),
    global_batch: int = typer.Option(32, "--global-batch", min=1, help="Sequences per optimizer step."),
    seq: int = typer.Option(2048, "--seq", "--seq-len", min=1),
    json_out: Path = typer.Option(None, "--json"),
) -> None:
    """Choose micro-batch, accumulation, checkpointing, AMP and optimizer that fit BUDGET with the most throughput."""
    from ..memory.plan import plan_training

    check_json_out(json_out)
    plan = plan_training(model, budget=parse_bytes(budget), global_batch=global_batch, seq_len=seq)
    console.print(table("training plan", ["setting", "value"], [
        ["micro-batch", plan.micro_batch], ["gradient accumulation", plan.grad_accum],
        ["activation checkpointing", "on" if plan.grad_checkpointing else "off"], ["amp", plan.amp],
        ["optimizer", plan.optimizer], ["estimated peak", fmt_bytes(plan.peak_bytes)], ["budget", fmt_bytes(plan.budget)],
    ]))
    console.print(plan.estimate.table("estimated memory of the plan"))
    for line in plan.explanation:
        console.print(f"- {line}", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(plan.to_dict(), indent=2, default=str))


@app.command()
def train(
    model: str = typer.Argument(..., help="Shipped model name or model folder to fine-tune."),
    text: Path = typer.Option(..., "--text", help="UTF-8 training text file."),
    out: Path = typer.Option(..., "--out", help="Output folder: checkpoint/ (resumable) and model/ (final)."),
    eval_text: Path = typer.Option(None, "--eval-text", help="Held-out text for periodic evaluation."),
    budget: str = typer.Option(None, help="Plan micro-batch/accumulation/checkpointing/amp to fit this budget."),
    steps: int = typer.Option(100, min=1),
    global_batch: int = typer.Option(8, "--global-batch", min=1),
    micro_batch: int = typer.Option(None, "--micro-batch", min=1, help="Without --budget: sequences per micro-step."),
    seq: int = typer.Option(512, "--seq", "--seq-len", min=2),
    lr: float = typer.Option(3e-4),
    warmup: int = typer.Option(0, "--warmup", min=0),
    amp: str = typer.Option("bf16", help="bf16, fp16 or none (without --budget)"),
    ckpt: bool = typer.Option(False, "--ckpt/--no-ckpt"),
    eval_every: int = typer.Option(0, "--eval-every", min=0),
    save_every: int = typer.Option(0, "--save-every", min=0),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: replace the checkpoint and model "
                                   "already in --out instead of resuming from them."),
) -> None:
    """Fine-tune MODEL on a text file with the openautoglm loop (AMP, accumulation, checkpointing, resumable).

    --out holds checkpoint/ (a run started again with the same --out resumes from it), model/ (the final
    model) and train_result.json."""
    from .. import hub
    from ..errors import OutputExistsError
    from ..memory.plan import plan_training
    from ..training import checkpoints as _train_io
    from ..training.loop import TrainConfig
    from ..training.loop import train as run_train

    dev = pick_device(device)
    train_text = read_text_file(text, "--text")
    eval_data = read_text_file(eval_text, "--eval-text") if eval_text is not None else None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder for the run")
    resuming = not overwrite and _train_io.has_checkpoint(out)
    if (out / "model").exists() and not resuming and not overwrite:
        raise OutputExistsError("--out already holds model/ of another run (no checkpoint to resume); pass "
                                "--overwrite to replace it", str(out / "model"))
    hub.check_output_dir(out / "model", overwrite=True, what="--out model/")
    from ..memory.plan import MAX_GLOBAL_BATCH

    if global_batch > MAX_GLOBAL_BATCH:
        raise ValueError(f"--global-batch {global_batch} is more than {MAX_GLOBAL_BATCH:,} sequences per step")
    common = dict(steps=steps, lr=lr, warmup_steps=warmup, eval_every=eval_every, save_every=save_every,
                  out_dir=str(out), progress=progress, resume=not overwrite)
    if budget:
        plan = plan_training(model, budget=parse_bytes(budget), global_batch=global_batch, seq_len=seq)
        for line in plan.explanation:
            console.print(f"- {line}", highlight=False)
        cfg = plan.train_config(**common)
    else:
        mb = micro_batch or global_batch
        if global_batch % mb:
            raise ValueError(f"--global-batch {global_batch} is not a multiple of --micro-batch {mb}")
        cfg = TrainConfig(micro_batch=mb, grad_accum=global_batch // mb, seq_len=seq, amp=amp, grad_checkpointing=ckpt,
                          **common)
    if dev == "cpu" and cfg.amp == "fp16":
        raise ValueError("amp fp16 needs a GPU; use --amp bf16 or none on the CPU")
    m = hub.from_pretrained(model, device=dev)
    tok = hub.load_tokenizer(model)
    res = run_train(m, train_text, cfg, tokenizer=tok, eval_data=eval_data)
    final = hub.save_pretrained(m, out / "model", tokenizer=tok, overwrite=True)  # this run's own model/
    rows = [["steps", res.steps], ["resumed from step", res.resumed_from], ["final loss", f"{res.final_loss:.4f}"],
            ["tokens/s", f"{res.tokens_per_s:,.0f}"], ["model", str(final)]]
    if res.evals:
        rows.append(["eval loss / perplexity", f"{res.evals[-1]['loss']:.4f} / {res.evals[-1]['perplexity']:.2f}"])
    if res.peak_memory_bytes:
        rows.append(["peak GPU memory", fmt_bytes(res.peak_memory_bytes)])
    console.print(table("training", ["item", "value"], rows))
