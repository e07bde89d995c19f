"""``report.md`` and ``report.html`` (PNG plots embedded) for an :class:`AutoResult`.

The report is built once as a list of blocks (heading, paragraph, table, image, code) and rendered twice, so
the Markdown and the HTML always say the same thing. Files are written to temporary names and renamed.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..budget import fmt_bytes
from . import plots

if TYPE_CHECKING:  # the result only types the arguments: at run time result.py imports this module
    from ..result import AutoResult

log = logging.getLogger(__name__)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.2f}%"


def _blocks(r: AutoResult, images: dict[str, str], title: str) -> list[tuple]:
    q, p, m = r.quality, r.pick, r.measured
    budgeted = " + ".join(t.replace("_", " ") for t in r.budget_terms)
    rows = [["budget", f"{fmt_bytes(r.budget)} ({budgeted}) at batch {r.batch} x context {r.context}"],
            ["pick", r.describe(p) + (f" ({p.label})" if p.kind == "uniform" and p.label else "")],
            ["why", r.selection],
            ["estimated memory", f"{fmt_bytes(p.bytes)} ({100 * p.bytes / r.budget:.1f}% of the budget)"]]
    if m:
        rows.append(["measured peak", f"{fmt_bytes(m['peak'])} on {m['device']}"
                     + (f" (reserved {fmt_bytes(m['reserved_peak'])})" if "reserved_peak" in m else "")])
    if q:
        rows += [["held-out perplexity", f"{q['perplexity_original']:.3f} -> {q['perplexity']:.3f} "
                                         f"({_pct(q['perplexity_increase'])})"]]
        if "bleu4" in q:
            rows.append(["BLEU-4 vs the original's generations", f"{q['bleu4']:.1f}"])
        if "attention_cosine" in q:
            a = q["attention_cosine"]
            rows.append(["attention-score cosine (mean / min)", f"{a['mean']:.4f} / {a['min']:.4f}"])
    sens_time = (f"sensitivities read from the disk cache; measuring them took {r.sensitivities.seconds:.0f} s"
                 if r.sensitivities.cached else f"of which sensitivities {r.sensitivities.seconds:.0f} s")
    rows.append(["time", f"{r.seconds.get('total', 0):.0f} s ({sens_time})"])
    out = [("h1", title), ("table", ["", ""], rows)]
    out += [("h2", "Memory"), ("img", images.get("memory"), "memory before and after")]
    est = r.estimate_after.terms
    mrows = [[k.replace("_", " "), fmt_bytes(r.estimate_before.terms.get(k, 0)), fmt_bytes(est.get(k, 0)),
              fmt_bytes(m[k]) if m and k in m else ""] for k in ("weights", "kv_cache", "activations", "logits", "workspace")]
    if m:
        rest = sum(est.get(k, 0) for k in ("activations", "logits", "workspace"))
        mrows.append(["activations + logits + workspace", "", fmt_bytes(rest), fmt_bytes(m["activations+workspace"])])
    mrows.append(["total", fmt_bytes(r.estimate_before.total), fmt_bytes(r.estimate_after.total),
                  fmt_bytes(m["peak"]) if m else ""])
    out.append(("table", ["term", "original (estimate)", "compressed (estimate)", "compressed (measured)"], mrows))
    if m:
        out.append(("p", f"Measured: {m['device']}, a prefill of {r.batch} x {r.context - 2} tokens through the "
                         f"recipe's cache then 2 decode steps; peak / estimate = {m['peak'] / r.estimate_after.total:.3f}."))
    out += [("h2", "Candidates"), ("img", images.get("pareto"), "perplexity vs memory")]
    bu = r.best_uniform()
    crow = [[c.kind, c.label or r.describe(c), fmt_bytes(c.bytes), f"{r.perplexity(c, False):.3f}",
             "" if c.measured is None else f"{r.perplexity(c):.3f}"] for c in r.shortlist]
    out.append(("table", ["kind", "recipe", "memory", "calib. ppl (predicted)", "verification ppl (measured)"], crow))
    base = math.exp(r.sensitivities.base_nll)
    vbase = f"{math.exp(r.verify_base_nll):.3f}" if r.verify_base_nll is not None else f"{base:.3f}"
    out.append(("p", f"Perplexity of the original: {base:.3f} on the calibration text "
                     f"({r.sensitivities.calibration.get('tokens')} tokens, where the signals were measured), {vbase} on "
                     f"the verification text ({r.verify_tokens} tokens). Predictions use the signals shrunk towards "
                     "each option's mean as far as their noise demands, clamped at 0 and made monotone in bits. "
                     f"{len(r.uniform)} uniform recipes were enumerated, "
                     f"{sum(c.bytes <= r.budget for c in r.uniform)} fit; the best-predicted that fits: "
                     + (f"{bu.label} ({fmt_bytes(bu.bytes)})." if bu else "none.")
                     + f" The smallest recipe of the search space needs {fmt_bytes(r.smallest.bytes)}."))
    out += [("h2", "Per layer"), ("img", images.get("bits"), "bits per layer")]
    srow = []
    s = r.sensitivities
    for i, u in enumerate(r.units):
        srow.append([u.name, r.options[p.weights[i]]] + [
            "" if math.isinf(v) else f"{v:+.4f}" for v in s.weight[i]])
    out.append(("table", ["unit", "chosen"] + [f"dNLL {o}" for o in r.options], srow))
    krow = [[f"layer {layer}", "bf16" if r.kv_options[b] is None else f"int{r.kv_options[b]}"]
            + [f"{v:+.4f}" for v in s.kv[layer]] for layer, b in enumerate(p.kv)]
    out.append(("table", ["KV", "chosen"] + [f"dNLL {'bf16' if b is None else f'int{b}'}" for b in r.kv_options], krow))
    out.append(("p", "dNLL: mean NLL increase (nats/token) on the calibration text with only that change applied. "
                     "Pruning levels (fraction of GQA groups removed; taylor = the library's global ranking, "
                     "measured = split over layers by the per-layer costs below): "
                     + ", ".join(f"{s.level_name(i)}: {v:+.4f}" for i, v in enumerate(s.prune) if i) + "."))
    if s.layer_prune:
        k = max(len(row) for row in s.layer_prune)
        prow = [[f"layer {layer}"] + [f"{row[j]:+.4f}" if j < len(row) else "" for j in range(1, k)]
                for layer, row in enumerate(s.layer_prune)]
        out.append(("table", ["pruned alone"] + [f"dNLL {j} group{'s' if j > 1 else ''}" for j in range(1, k)], prow))
    if q.get("generations"):
        g = q["generations"][0]
        out += [("h2", "A generation"), ("code", f"prompt: {g['prompt']}\n--- original:\n{g['original']}\n"
                                                 f"--- compressed:\n{g['compressed']}")]
    if r.notes:
        out += [("h2", "Notes"), ("p", " ".join(r.notes))]
    out += [("h2", "Recipe"), ("p", "Replay with `openautoglm compress MODEL --recipe recipe.json --out DIR`."),
            ("code", json.dumps(r.recipe, indent=1))]
    return out


def _md(blocks) -> str:
    lines = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "img" and b[1]:
            lines += [f"![{b[2]}]({b[1]})", ""]
        elif b[0] == "table":
            lines += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in b[2]] + [""]
        elif b[0] == "code":
            lines += ["```", b[1], "```", ""]
    return "\n".join(lines)


def _html(blocks, out_dir: Path) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>openautoglm report</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;font-size:90%}img{max-width:100%}"
             "pre{background:#f5f5f5;padding:.5em;overflow:auto;font-size:80%}</style></head><body>"]
    for b in blocks:
        if b[0] in ("h1", "h2"):
            parts.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "img" and b[1]:
            data = base64.b64encode((out_dir / b[1]).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b[0] == "code":
            parts.append(f"<pre>{html.escape(b[1])}</pre>")
    return "\n".join(parts + ["</body></html>"])


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, "utf-8")
    tmp.replace(path)


def write_report(r: AutoResult, out_dir: Path, title: str | None = None) -> Path:
    """Plots (PNG), ``report.md`` and ``report.html`` in ``out_dir`` (created); returns ``report.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    try:
        for key, fn in (("memory", plots.memory_bars), ("pareto", plots.pareto_scatter), ("bits", plots.layer_bits)):
            fn(r, out_dir / f"{key}.png")
            images[key] = f"{key}.png"
    except ImportError as e:  # matplotlib missing: the report still says everything in tables
        log.warning("%s; writing the report without plots", e)
    blocks = _blocks(r, images, title or "openautoglm: compression to a memory budget")
    _write(out_dir / "report.md", _md(blocks))
    _write(out_dir / "report.html", _html(blocks, out_dir))
    return out_dir / "report.md"
