"""Pruning steps for the CLI: ``--prune-heads RATIO --prune-experts RATIO --sparsity S --sparsity-method magnitude|wanda
--sparsity-pattern unstructured|2:4 --low-rank ENERGY`` (used by ``compress`` before quantization), and the
``openautoglm prune`` command that runs them alone and saves the result.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, console
from ._common import check_dtype, fmt_bytes, read_text_file, table

HELP = {
    "prune_heads": "Remove this fraction of attention query heads (0-1, Taylor importance, global ranking).",
    "prune_experts": "Remove this fraction of each MoE layer's routed experts (0-1, the least routed on the "
                     "calibration text; the router renormalizes over the rest).",
    "sparsity": "Zero this fraction of the decoder Linear weights (0-1).",
    "sparsity_method": "Weight importance for --sparsity: magnitude or wanda (activation-aware).",
    "sparsity_pattern": "unstructured, or 2:4 (semi-structured; implies 50%).",
    "low_rank": "Factorize Linears with activation-aware SVD keeping this fraction of energy (0-1].",
    "calib_text": "Calibration text file (default: the bundled held-out text).",
    "calib_samples": "Calibration windows of 256 tokens.",
}


def pruning_steps(model, tokenizer, *, prune_heads: float | None = None, prune_experts: float | None = None,
                  sparsity: float | None = None,
                  sparsity_method: str = "wanda", sparsity_pattern: str = "unstructured",
                  low_rank: float | None = None, calib_text: Path | None = None, calib_samples: int = 32) -> dict:
    """Apply the pruning options to ``model`` in place and print what they saved; returns the results."""
    from ..prune import PruneRecipe, apply_pruning

    if sparsity_method not in ("magnitude", "wanda"):
        raise ValueError(f"--sparsity-method {sparsity_method!r}; accepted: magnitude, wanda")
    if sparsity_pattern not in ("unstructured", "2:4"):
        raise ValueError(f"--sparsity-pattern {sparsity_pattern!r}; accepted: unstructured, 2:4")
    recipe = PruneRecipe(prune_heads=prune_heads, prune_experts=prune_experts, sparsity=sparsity,
                         sparsity_method=sparsity_method, sparsity_pattern=sparsity_pattern, low_rank=low_rank,
                         n_samples=calib_samples)
    if recipe.empty:
        return {}
    text = None
    if calib_text is not None:
        if not Path(calib_text).is_file():
            raise ValueError(f"--calib-text {calib_text}: no such file")
        text = read_text_file(calib_text, "--calib-text")
    p0 = sum(p.numel() for p in model.parameters())
    res = apply_pruning(model, recipe, tokenizer, text=text)
    rows = []
    if "heads" in res:
        h = res["heads"]
        rows.append(["heads", f"{sum(q for q, _ in h.heads_before)} -> {sum(q for q, _ in h.heads_after)} query, "
                              f"{sum(k for _, k in h.heads_before)} -> {sum(k for _, k in h.heads_after)} KV",
                     fmt_bytes(h.attn_weight_bytes_before - h.attn_weight_bytes_after)])
    if "experts" in res:
        e = res["experts"]
        rows.append(["experts", f"{sorted(set(e.experts_before.values()))} -> {sorted({len(k) for k in e.kept.values()})}"
                                f" per MoE layer ({len(e.kept)} layers)", fmt_bytes(e.bytes_before - e.bytes_after)])
    if "low_rank" in res:
        lr = res["low_rank"]
        rows.append(["low-rank", f"{len(lr.ranks)} modules factorized, {len(lr.skipped)} left dense",
                     f"{lr.params_before - lr.params_after:,} params"])
    if "sparsity" in res:
        s = res["sparsity"]
        rows.append(["sparsity", f"{s.params_pruned:,} of {s.params_targeted:,} weights zeroed ({sparsity_pattern})",
                     "0 B stored dense" + (" (2:4: GPU semi-structured at runtime)" if sparsity_pattern == "2:4" else "")])
    p1 = sum(p.numel() for p in model.parameters())
    rows.append(["parameters", f"{p0:,} -> {p1:,}", f"{(1 - p1 / p0) * 100:.1f}% fewer"])
    console.print(table("pruning", ["step", "what", "saved"], rows))
    return res


def pruning_step(*, prune_heads: float | None, sparsity: float | None, sparsity_method: str, sparsity_pattern: str,
                 low_rank: float | None, calib_text: Path | None = None, calib_samples: int = 32,
                 prune_experts: float | None = None):
    """Validate the pruning options now; return ``fn(model, tokenizer) -> summary dict`` or None if no option is set.
    ``compress`` runs it before quantization."""
    from ..prune import PruneRecipe

    if sparsity_method not in ("magnitude", "wanda"):
        raise ValueError(f"--sparsity-method {sparsity_method!r}; accepted: magnitude, wanda")
    if sparsity_pattern not in ("unstructured", "2:4"):
        raise ValueError(f"--sparsity-pattern {sparsity_pattern!r}; accepted: unstructured, 2:4")
    if PruneRecipe(prune_heads=prune_heads, prune_experts=prune_experts, sparsity=sparsity,
                   sparsity_method=sparsity_method, sparsity_pattern=sparsity_pattern, low_rank=low_rank,
                   n_samples=calib_samples).empty:
        return None

    def run(model, tokenizer) -> dict:
        p0 = sum(p.numel() for p in model.parameters())
        res = pruning_steps(model, tokenizer, prune_heads=prune_heads, prune_experts=prune_experts, sparsity=sparsity,
                            sparsity_method=sparsity_method, sparsity_pattern=sparsity_pattern, low_rank=low_rank,
                            calib_text=calib_text, calib_samples=calib_samples)
        return {"steps": list(res), "parameters": f"{p0:,} -> {sum(p.numel() for p in model.parameters()):,}"}

    return run


@app.command()
def prune(
    model: str = typer.Argument(..., help="Shipped model name or local model folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write the pruned model to."),
    prune_heads: float = typer.Option(None, "--prune-heads", help=HELP["prune_heads"]),
    prune_experts: float = typer.Option(None, "--prune-experts", help=HELP["prune_experts"]),
    sparsity: float = typer.Option(None, "--sparsity", help=HELP["sparsity"]),
    sparsity_method: str = typer.Option("wanda", "--sparsity-method", help=HELP["sparsity_method"]),
    sparsity_pattern: str = typer.Option("unstructured", "--sparsity-pattern", help=HELP["sparsity_pattern"]),
    low_rank: float = typer.Option(None, "--low-rank", help=HELP["low_rank"]),
    calib_text: Path = typer.Option(None, "--calib-text", help=HELP["calib_text"]),
    calib_samples: int = typer.Option(32, "--calib-samples", min=1, help=HELP["calib_samples"]),
    dtype: str = typer.Option("auto", help="auto (checkpoint's), bf16, fp16, fp32"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already holds a model."),
) -> None:
    """Prune a model (heads, experts, sparsity, low-rank) on the CPU and save it; it reloads with its new shapes."""
    from .. import hub

    check_dtype(dtype)
    hub.check_output_dir(out, overwrite=overwrite, what="--out")
    if pruning_step(prune_heads=prune_heads, sparsity=sparsity, sparsity_method=sparsity_method,
                    sparsity_pattern=sparsity_pattern, low_rank=low_rank, calib_text=calib_text,
                    calib_samples=calib_samples, prune_experts=prune_experts) is None:
        raise ValueError("nothing to do: give --prune-heads, --prune-experts, --sparsity, --sparsity-pattern 2:4 or "
                         "--low-rank")
    if calib_text is not None and not Path(calib_text).is_file():
        raise ValueError(f"--calib-text {calib_text}: no such file")
    tok = hub.load_tokenizer(model)
    m = hub.from_pretrained(model, dtype=None if dtype == "auto" else dtype)
    res = pruning_steps(m, tok, prune_heads=prune_heads, prune_experts=prune_experts, sparsity=sparsity,
                        sparsity_method=sparsity_method,
                        sparsity_pattern=sparsity_pattern, low_rank=low_rank, calib_text=calib_text,
                        calib_samples=calib_samples)
    if not res:
        raise ValueError("nothing to do: give --prune-heads, --sparsity, --sparsity-pattern 2:4 or --low-rank")
    hub.save_pretrained(m, out, tokenizer=tok, overwrite=overwrite)
    console.print(f"saved {out}")
