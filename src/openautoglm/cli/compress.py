"""``openautoglm compress MODEL [--bits 8|4 [--scheme ...]] [pruning options] --out DIR``: save a reloadable model.

Quantization alone streams (``quantize_pretrained``: one layer in memory, output written as layers finish).
With pruning options the command loads the model whole, runs a list of *steps* over it, then saves it once.
Each step runs only when its options are given: ``--sparsity 0.5`` alone prunes and does not quantize.
Quantization is the last step; other capabilities add theirs in front (pruning: ``--prune-heads``,
``--sparsity``, ``--low-rank``)
by declaring their options on :func:`compress` and appending to ``steps`` in the marked place -- each step
is ``(title, fn)`` with ``fn(model) -> dict`` of figures to print, and runs under the same progress display.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .. import _hf, hub
from ..memory.estimate import model_bytes
from ._app import app, console
from ._common import check_dtype, fmt_bytes, pick_device, read_text_file, table
from .prune import HELP as PRUNE_HELP
from .prune import pruning_step


def _quant_request(bits: int | None, scheme: str | None, group_size: int | None, include: list[str] | None,
                   exclude: list[str] | None, observer: str | None) -> tuple[int | None, str | None]:
    """``(bits, scheme)`` to quantize with, or ``(None, None)`` when quantization was not asked for.

    Quantization runs only when ``--bits`` or ``--scheme`` is given (``--scheme`` alone implies its bits);
    the options that only tune it are refused without them, so nothing is quantized by surprise.
    """
    from ..quant.config import QuantConfig

    if bits is None and scheme is None:
        tuning = [o for o, v in (("--group-size", group_size), ("--include", include), ("--exclude", exclude),
                                 ("--observer", observer)) if v]
        if tuning:
            raise ValueError(f"{', '.join(tuning)} only tune quantization, which runs when --bits 8|4 "
                             "(or --scheme) is given; add --bits, or drop them")
        return None, None
    if bits is not None and bits not in (4, 8):
        raise ValueError(f"--bits {bits} is not supported; accepted: 8 or 4")
    if scheme is None:
        return bits, None  # DynamicQuantizer picks: w8a8 (int8 or fp8, whichever is faster here) or w4
    scheme_bits = QuantConfig(scheme=scheme).bits
    if bits is not None and scheme_bits != bits:
        raise ValueError(f"--scheme {scheme} is not a {bits}-bit scheme; 8-bit: w8a8, w8a8-fp8, w8, static; 4-bit: w4")
    return scheme_bits, scheme


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def quantize_step(bits: int, scheme: str | None, group_size: int | None, include: list[str], exclude: list[str],
                  observer: str, calib_text: Path | None, tokenizer):
    """The quantization step as ``fn(model, progress_callback) -> dict``."""
    from ..quant import DynamicQuantizer, StaticQuantizer

    def run(model, progress) -> dict:
        if scheme == "static":
            text = read_text_file(calib_text, "--calib-text") if calib_text else None
            StaticQuantizer(observer=observer, include=include, exclude=exclude).quantize(
                model, tokenizer=tokenizer, text=text, progress=progress)
        else:
            DynamicQuantizer.quantize(model, bits, scheme=scheme, group_size=group_size, include=include,
                                      exclude=exclude, progress=progress)
        r = model.quant_result
        return {"scheme": r.config.scheme, "quantized": len(r.quantized), "skipped": r.skipped,
                "full_precision": r.full_precision}

    return run


@app.command()
def compress(
    model: str = typer.Argument(..., help="Shipped model name or local model folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write the compressed model to."),
    bits: int = typer.Option(None, "--bits", help="Quantize the weights: 8 (w8a8) or 4 (w4, group 128). "
                             "Without --bits or --scheme nothing is quantized."),
    scheme: str = typer.Option(None, "--scheme", help="w8a8, w8a8-fp8, w8, w4 or static (implies --bits; "
                               "default: from --bits)."),
    group_size: int = typer.Option(None, "--group-size", help="Weight group for w8/w4: 32, 64, 128."),
    include: list[str] = typer.Option(None, "--include", help="Quantize modules matching this wildcard "
                                      "(repeatable; default: all)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Skip modules matching this wildcard "
                                      "(repeatable; default: lm_head)."),
    observer: str = typer.Option(None, "--observer", help="static: activation range observer, minmax (default) "
                                 "or percentile."),
    calib_text: Path = typer.Option(None, "--calib-text", help="static: calibration text file (default: held-out text)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N (where quantization runs)."),
    dtype: str = typer.Option("auto", help="auto (checkpoint's), bf16, fp16, fp32"),
    prune_heads: float = typer.Option(None, "--prune-heads", help=PRUNE_HELP["prune_heads"]),
    prune_experts: float = typer.Option(None, "--prune-experts", help=PRUNE_HELP["prune_experts"]),
    sparsity: float = typer.Option(None, "--sparsity", help=PRUNE_HELP["sparsity"]),
    sparsity_method: str = typer.Option("wanda", "--sparsity-method", help=PRUNE_HELP["sparsity_method"]),
    sparsity_pattern: str = typer.Option("unstructured", "--sparsity-pattern", help=PRUNE_HELP["sparsity_pattern"]),
    low_rank: float = typer.Option(None, "--low-rank", help=PRUNE_HELP["low_rank"]),
    calib_samples: int = typer.Option(32, "--calib-samples", min=1, help="pruning: " + PRUNE_HELP["calib_samples"]),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already holds a model."),
    budget: str = typer.Option(None, "--budget", help="Search the least lossy recipe that fits this memory "
                               "(12GiB, 512MB, or auto = free memory of the GPU) and write a report."),
    context: int = typer.Option(None, "--context", min=1, help="--budget: tokens per sequence to serve."),
    batch: int = typer.Option(1, "--batch", min=1, help="--budget: sequences served at once."),
    recipe: Path = typer.Option(None, "--recipe", help="Replay a recipe (.json/.yaml, or a folder made by --budget)."),
    headroom: float = typer.Option(0.03, "--headroom", help="--budget: fraction kept free for fragmentation."),
    budget_terms: str = typer.Option("all", "--budget-terms", help="--budget: what must fit: all, or weights+kv."),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", min=2, help="--budget: calibration tokens."),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", min=2, help="--budget: held-out tokens for the report."),
    verify_tokens: int = typer.Option(8192, "--verify-tokens", min=2, help="--budget: fresh calibration tokens on "
                                      "which the best candidates are verified together."),
    report: bool = typer.Option(True, "--report/--no-report", help="--budget: quality check, measured memory, report."),
    search_schemes: str = typer.Option(None, "--search-schemes", help="--budget: weight options searched per layer "
                                       "(comma list of bf16, w8, w8a8, w4g128, w4g64, w4g32; default all but w8a8)."),
    search_kv_bits: str = typer.Option(None, "--search-kv-bits", help="--budget: KV widths searched per layer "
                                       "(comma list of none, 8, 4, 2; default all)."),
    search_prune: str = typer.Option(None, "--search-prune", help="--budget: head-pruning fractions searched "
                                     "(comma list in [0, 1); default 0,0.125,0.25,0.375,0.5; 0 = no pruning)."),
    sensitivity: str = typer.Option("fisher", "--sensitivity", help="--budget: fisher (one backward pass, about ten "
                                    "evaluations; default) or measured (one evaluation per layer and option: hours "
                                    "on a CPU)."),
    time_limit: float = typer.Option(None, "--time-limit", min=1, help="--budget: seconds; when spent, the best "
                                     "recipe verified so far is applied and the report says what was skipped."),
) -> None:
    """Compress MODEL (prune, then quantize: each only when its options are given) and save a checkpoint that
    reloads without the recipe. Quantization runs only with --bits or --scheme; --budget searches the recipe
    (mixed precision per layer, KV bits, head pruning) that fits a memory budget; --recipe replays one.

    Quantization alone streams: shards are read tensor by tensor, each Linear is quantized on --device as it
    arrives and each finished layer is written out, so a model larger than the machine's memory compresses in
    about one layer of memory. Pruning needs the whole model in memory.
    """
    if budget is not None or recipe is not None:
        from . import auto

        auto.check_exclusive(budget, recipe, {
            "--bits": bits, "--scheme": scheme, "--group-size": group_size, "--include": include, "--exclude": exclude,
            "--observer": observer, "--prune-heads": prune_heads, "--prune-experts": prune_experts,
            "--sparsity": sparsity, "--low-rank": low_rank})
        search = auto.search_space(search_schemes, search_kv_bits, search_prune)
        if sensitivity not in ("fisher", "measured"):
            raise ValueError(f"--sensitivity {sensitivity!r}; accepted: fisher, measured")
        search.update(sensitivity=sensitivity, time_limit=time_limit)
        check_dtype(dtype)
        if recipe is not None:
            return auto.run_recipe(model, out, recipe=recipe, device=device, dtype=dtype, overwrite=overwrite)
        return auto.run_budget(model, out, budget=budget, context=context, batch=batch, device=device, dtype=dtype,
                               headroom=headroom, budget_terms=budget_terms, calib_tokens=calib_tokens,
                               eval_tokens=eval_tokens, verify_tokens=verify_tokens, report=report, search=search,
                               overwrite=overwrite)
    bits, scheme = _quant_request(bits, scheme, group_size, include, exclude, observer)
    pruning = pruning_step(prune_heads=prune_heads, sparsity=sparsity, sparsity_method=sparsity_method,
                           sparsity_pattern=sparsity_pattern, low_rank=low_rank, calib_text=calib_text,
                           calib_samples=calib_samples, prune_experts=prune_experts)
    if pruning is None and bits is None:
        raise ValueError("nothing to do: give --bits 8|4 (or --scheme) to quantize, and/or --prune-heads, "
                         "--prune-experts, --sparsity, --sparsity-pattern 2:4 or --low-rank to prune")
    if calib_text is not None and not calib_text.is_file():
        raise ValueError(f"--calib-text {calib_text}: no such file")
    if bits is not None:  # every quantization option is checked now, not after loading the model
        from ..quant.config import QuantConfig

        QuantConfig(scheme=scheme or ("w4" if bits == 4 else "w8a8"), group_size=group_size,
                    include=tuple(include or ["*"]), exclude=tuple(exclude or ["lm_head"]),
                    observer="minmax" if observer is None else observer)
    check_dtype(dtype)
    hub.check_output_dir(out, overwrite=overwrite, what="--out")
    dev = pick_device(device)
    if pruning is None:
        return _compress_streaming(model, out, bits, scheme, group_size, list(include or ["*"]),
                                   list(exclude or ["lm_head"]), "minmax" if observer is None else observer,
                                   calib_text, dev, dtype, overwrite)
    console.print("[yellow]pruning needs the whole model in memory[/] (its importance scores and calibration run the "
                  "full model): loading it, then pruning" + (" and quantizing" if bits else "") + " in memory",
                  highlight=False)
    t0 = time.perf_counter()
    m = hub.from_pretrained(model, dtype=dtype, device=dev)
    tok = hub.load_tokenizer(model)
    before = model_bytes(m)
    n_linear_before = sum(1 for _ in m.modules() if _hf.is_linear_like(_))

    steps: list[tuple[str, object]] = []
    # -- other capabilities insert their steps here (before quantization), e.g. pruning:
    #    steps.append(("pruning", lambda model, progress: pruning_steps(model, tok, ...)))
    steps.append(("pruning", lambda model, progress: pruning(model, tok)))  # heads -> low-rank -> sparsity
    if bits is not None:
        steps.append(("quantizing", quantize_step(bits, scheme, group_size, list(include or ["*"]),
                                                   list(exclude or ["lm_head"]),
                                                   "minmax" if observer is None else observer, calib_text, tok)))

    results: dict[str, dict] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        for title, fn in steps:
            task = bar.add_task(title, total=None)

            def progress(name: str, i: int, n: int, task=task, title=title) -> None:
                bar.update(task, total=n, completed=i, description=f"{title} {name}")

            results[title] = fn(m, progress) or {}
            bar.update(task, description=f"{title} done")
    after = model_bytes(m)
    path = hub.save_pretrained(m, out, tokenizer=tok, overwrite=overwrite)
    q = results.get("quantizing")
    n_linear_after = sum(1 for _ in m.modules() if _hf.is_linear_like(_))
    _report(model, Path(path), q["scheme"] if q else "not quantized", time.perf_counter() - t0, before, after,
            n_linear_before, n_linear_after, q["quantized"] if q else 0, q["skipped"] if q else {},
            q["full_precision"] if q else {})
    for title, res in results.items():
        if title != "quantizing":
            console.print(f"{title}: {res}")


def _compress_streaming(model: str, out: Path, bits: int, scheme: str | None, group_size: int | None,
                        include: list[str], exclude: list[str], observer: str, calib_text: Path | None, dev: str,
                        dtype: str, overwrite: bool = False) -> None:
    """Checkpoint -> quantized checkpoint, one layer in memory (``quantize_pretrained``), a bar per shard."""
    from torch import nn

    from ..quant import QuantConfig, quantize_pretrained

    path = hub.resolve_model_path(model)
    tok_note = "" if hub.has_tokenizer(path) else " (no tokenizer files in the source: none copied)"
    if not tok_note:
        hub.load_tokenizer(path)  # its files are copied as they are: a broken or code-carrying one fails now
    if scheme is None:  # as DynamicQuantizer: w4, or the faster of int8 / fp8 w8a8 on this device
        from ..quant.onload import resolve_config

        scheme = resolve_config(None, bits, dev).scheme
    config = QuantConfig(scheme=scheme, group_size=group_size, observer=observer, include=tuple(include),
                         exclude=tuple(exclude))
    empty = hub.empty_model(path)
    n_linear = sum(1 for m in empty.modules() if type(m) is nn.Linear)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(shard: str, done: int, total: int) -> None:
            if shard not in tasks:
                tasks[shard] = bar.add_task(shard, total=total)
            bar.update(tasks[shard], completed=done)

        text = read_text_file(calib_text, "--calib-text") if calib_text is not None else None
        r = quantize_pretrained(path, out, config, device=dev, dtype=None if dtype == "auto" else dtype,
                                calib_text=text, progress=progress, overwrite=overwrite)
    _report(model, r.path, r.config.scheme, r.seconds, r.bytes_before, r.bytes_after, n_linear,
            n_linear - sum(1 for n in r.quantized if type(empty.get_submodule(n)) is nn.Linear), len(r.quantized),
            r.skipped, r.full_precision)
    if tok_note:
        console.print(tok_note.strip(" ()"), highlight=False)


def _report(model: str, path: Path, scheme: str, seconds: float, before: int, after: int, n_before: int,
            n_after: int, n_quantized: int, skipped: dict[str, str], full_precision: dict | None = None) -> None:
    rows = [
        ["weights in memory", fmt_bytes(before), fmt_bytes(after), f"{after / before:.3f}x"],
        ["Linear layers (float)", n_before, n_after, ""],
        ["checkpoint on disk", "", fmt_bytes(_dir_bytes(path)), ""],
    ]
    console.print(table(f"{model} -> {path} ({scheme}, {seconds:.1f} s)", ["", "before", "after", "ratio"], rows))
    if skipped:
        console.print(f"[yellow]not quantized ({len(skipped)}):[/] " +
                      "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:8]), highlight=False)
    if full_precision:  # never silent: every big tensor left in 16/32 bits, and why
        console.print(table("left in full precision (> 1% of the bytes each)", ["tensor", "bytes", "share", "why"],
                            [[k, fmt_bytes(v["bytes"]), f"{v['share']:.1%}", v["reason"]]
                             for k, v in full_precision.items()]))
    done = f"{n_quantized} layers quantized to {scheme}" if n_quantized else "weights left unquantized (no --bits)"
    console.print(f"{done}; reload with AutoModelForCausalLM.from_pretrained({str(path)!r})", highlight=False)
