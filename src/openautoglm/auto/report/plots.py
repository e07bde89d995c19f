"""The report's pictures (matplotlib, Agg backend): memory bars, the perplexity-vs-memory scatter, per-layer bits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..search import pareto

if TYPE_CHECKING:  # the result only types the arguments: at run time result.py imports this module
    from ..result import AutoResult


COLORS = {"weights": "#4C72B0", "kv_cache": "#DD8452", "activations": "#55A868", "logits": "#8C8C8C",
          "workspace": "#C44E52", "activations+workspace": "#55A868"}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the report's plots need matplotlib: pip install 'openautoglm[plot]'") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _unit(n: float) -> tuple[float, str]:
    return (2**30, "GiB") if n >= 2**30 else (2**20, "MiB") if n >= 2**20 else (2**10, "KiB")


def memory_bars(r: AutoResult, path: Path) -> Path:
    """Stacked bars: original (estimate), compressed (estimate), compressed (measured); the budget line."""
    plt = _plt()
    order = [t for t in r.budget_terms] + [t for t in ("weights", "kv_cache", "activations", "logits", "workspace")
                                          if t not in r.budget_terms]
    bars = [("original\n(estimate)", r.estimate_before.terms), ("compressed\n(estimate)", r.estimate_after.terms)]
    if r.measured:
        m = r.measured
        bars.append(("compressed\n(measured)", {"weights": m["weights"], "kv_cache": m["kv_cache"],
                                                "activations+workspace": max(0, m["activations+workspace"])}))
    div, unit = _unit(max(sum(t.values()) for _, t in bars))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    seen = set()
    for i, (name, terms) in enumerate(bars):
        bottom = 0.0
        for k in order + ["activations+workspace"]:
            v = terms.get(k, 0) / div
            if v <= 0:
                continue
            ax.bar(i, v, bottom=bottom, color=COLORS[k], label=None if k in seen else k.replace("_", " "), width=0.6)
            seen.add(k)
            bottom += v
        ax.text(i, bottom, f"{bottom:.3g}", ha="center", va="bottom", fontsize=9)
    ax.axhline(r.budget / div, color="k", ls="--", lw=1)
    what = "all terms" if set(r.budget_terms) >= {"weights", "kv_cache", "activations", "logits", "workspace"} \
        else " + ".join(t.replace("_", " ") for t in r.budget_terms)
    ax.text(len(bars) - 0.5, r.budget / div, f" budget ({what})", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylabel(unit)
    ax.set_title(f"memory at batch {r.batch} x context {r.context}")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def pareto_scatter(r: AutoResult, path: Path) -> Path:
    """Perplexity increase vs budgeted memory: uniform recipes and the search's trade-off curve (predicted on the
    calibration text), the verified shortlist and the pick (measured on the verification text), the Pareto front
    of the predicted points and the budget."""
    plt = _plt()
    pts = r.uniform + r.front

    def inc(c, measured=False):  # perplexity increase over the original, % (predicted: calibration; measured: verification)
        return 100 * math.expm1(c.measured if measured else c.predicted)

    div, unit = _unit(max(c.bytes for c in pts))
    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=100)
    ax.scatter([c.bytes / div for c in r.uniform], [inc(c) for c in r.uniform], s=14, c="#8C8C8C",
               alpha=0.6, label="uniform recipes (predicted)")
    ax.scatter([c.bytes / div for c in r.front], [inc(c) for c in r.front], s=14, c="#4C72B0",
               alpha=0.7, label="mixed per-layer recipes (predicted)")
    idx = pareto([(c.bytes, c.predicted) for c in pts])
    ax.step([pts[i].bytes / div for i in idx], [inc(pts[i]) for i in idx], where="post", color="#4C72B0", lw=1.2,
            label="Pareto front (predicted)")
    ver = [c for c in r.shortlist if c.measured is not None]
    ax.scatter([c.bytes / div for c in ver], [inc(c, True) for c in ver], s=40, facecolors="none",
               edgecolors="#DD8452", lw=1.5, label="verified together (measured)")
    ax.scatter([r.pick.bytes / div], [inc(r.pick, True)], marker="*", s=220, c="#C44E52", zorder=5, label="pick")
    ax.axvline(r.budget / div, color="k", ls="--", lw=1, label="budget")
    ax.axhline(0, color="#55A868", ls=":", lw=1, label="original")
    ys = [inc(c) for c in pts] + [inc(c, True) for c in ver]
    top = max(min(max(ys), 200.0), 5 * max(inc(c, True) for c in ver), 1.0)
    ax.set_ylim(min(-0.5, min(ys) * 1.1), top * 1.05)
    ax.set_xlabel(f"estimated memory ({unit}, {' + '.join(t.replace('_', ' ') for t in r.budget_terms)})")
    ax.set_ylabel("perplexity increase over the original (%)")
    ax.set_title("candidates: perplexity vs memory")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def layer_bits(r: AutoResult, path: Path) -> Path:
    """Per decoder layer: the weight option of its attention and MLP, its KV width, and the query heads kept."""
    plt = _plt()
    n = 1 + max(u.layer for u in r.units)
    rows = ["attention", "MLP", "KV cache"]
    bits = {"bf16": 16, "w8": 8, "w8a8": 8, "w4g128": 4.25, "w4g64": 4.5, "w4g32": 5}
    grid = [[math.nan] * n for _ in rows]
    text = [[""] * n for _ in rows]
    for u, o in zip(r.units, r.pick.weights):
        if u.layer < 0:
            continue
        row = 0 if u.kind == "attn" else 1
        grid[row][u.layer] = bits.get(r.options[o], 16)
        text[row][u.layer] = r.options[o]
    for layer, b in enumerate(r.pick.kv):
        v = r.kv_options[b]
        grid[2][layer] = 16 if v is None else v
        text[2][layer] = "bf16" if v is None else f"int{v}"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * n + 1.5), 2.6), dpi=100)
    im = ax.imshow(grid, cmap="viridis", vmin=2, vmax=16, aspect="auto")
    for i in range(len(rows)):
        for j in range(n):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7 if n <= 16 else 5,
                    color="w" if (grid[i][j] or 0) < 10 else "k", rotation=0 if n <= 16 else 90)
    ax.set_yticks(range(len(rows)), rows)
    removed = r.sensitivities.removed[r.pick.level]
    ax.set_xticks(range(n), [f"{j}" + (f"\n-{len(removed[j])}h" if removed.get(j) else "") for j in range(n)],
                  fontsize=7 if n <= 16 else 5)
    ax.set_xlabel("decoder layer (-Nh: query heads pruned)")
    fig.colorbar(im, ax=ax, label="bits per value")
    ax.set_title("chosen per layer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
