"""``openautoglm compress MODEL --budget 12GiB --context 16384 --batch 4 --out DIR`` and ``--recipe FILE``.

``--budget`` runs :func:`openautoglm.auto.compress_to_budget` and writes the model, ``recipe.json``,
``report.md`` / ``report.html`` (with its PNGs) and ``auto_result.json`` into DIR; ``--recipe`` replays a recipe
(a ``.json`` / ``.yaml`` file, or a model folder made by ``--budget``) and gives identical weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import hub
from ..memory.estimate import model_bytes
from ._app import console
from ._common import fmt_bytes, pick_device, table

BUDGET_TERMS = {"all": ("weights", "kv_cache", "activations", "logits", "workspace"),
                "weights+kv": ("weights", "kv_cache")}


def check_exclusive(budget, recipe, manual: dict) -> None:
    """``--budget`` / ``--recipe`` choose the whole recipe: refuse them together and with manual steps."""
    if budget is not None and recipe is not None:
        raise ValueError("give --budget (search a recipe) or --recipe (replay one), not both")
    given = [k for k, v in manual.items() if v not in (None, [], ())]
    if given:
        flag = "--budget" if budget is not None else "--recipe"
        raise ValueError(f"{flag} chooses the whole recipe; drop {', '.join(given)} (or drop {flag})")


def _items(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{flag} {text!r} is empty; give a comma-separated list")
    return items


def search_space(schemes: str | None, kv_bits: str | None, prune: str | None) -> dict:
    """``compress_to_budget`` keywords for the --search-* options (those given; validated there and here)."""
    from ..auto.space import WEIGHT_OPTIONS

    out: dict = {}
    if schemes is not None:
        out["schemes"] = tuple(_items(schemes, "--search-schemes"))
        bad = [x for x in out["schemes"] if x not in WEIGHT_OPTIONS]
        if bad:
            raise ValueError(f"--search-schemes: unknown weight options {bad}; accepted: {', '.join(WEIGHT_OPTIONS)}")
    if kv_bits is not None:
        bits = []
        for x in _items(kv_bits, "--search-kv-bits"):
            if x.lower() in ("none", "bf16", "fp16", "16"):
                bits.append(None)
            elif x in ("8", "4", "2"):
                bits.append(int(x))
            else:
                raise ValueError(f"--search-kv-bits: {x!r}; accepted: none (full precision), 8, 4, 2")
        out["kv_bits"] = tuple(bits)
    if prune is not None:
        try:
            out["prune_ratios"] = tuple(float(x) for x in _items(prune, "--search-prune"))
        except ValueError:
            raise ValueError(f"--search-prune {prune!r}: fractions in [0, 1), e.g. 0,0.125,0.25") from None
    return out


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def run_budget(model: str, out: Path, *, budget: str, context: int | None, batch: int, device: str, dtype: str,
               headroom: float, budget_terms: str, calib_tokens: int, eval_tokens: int, report: bool,
               verify_tokens: int = 8192, search: dict | None = None, overwrite: bool = False) -> None:
    from ..auto import compress_to_budget, parse_budget, save_recipe

    if context is None:
        raise ValueError("--budget needs --context: the tokens per sequence to serve (prompt + generated), e.g. 16384")
    if budget_terms not in BUDGET_TERMS:
        raise ValueError(f"--budget-terms {budget_terms!r}; accepted: {', '.join(BUDGET_TERMS)}")
    dev = pick_device(device)
    budget_bytes = parse_budget(budget, device=dev)  # fails before any loading (auto without a GPU, bad sizes)
    hub.check_output_dir(out, overwrite=overwrite, what="--out")
    t0 = time.perf_counter()
    m = hub.from_pretrained(model, dtype=dtype, device=dev)
    tok = hub.load_tokenizer(model)
    console.print(f"searching the recipe for {fmt_bytes(budget_bytes)} at batch {batch} x context {context} ...")
    r = compress_to_budget(m, budget_bytes, context=context, batch=batch, tokenizer=tok, headroom=headroom,
                           budget_terms=BUDGET_TERMS[budget_terms], calib_tokens=calib_tokens, eval_tokens=eval_tokens,
                           verify_tokens=verify_tokens, verify=report, measure_memory=report, **(search or {}))
    path = hub.save_pretrained(m, out, tokenizer=tok, overwrite=overwrite)
    save_recipe(r.recipe, Path(path) / "recipe.json")
    _write_json(Path(path) / "auto_result.json", r.to_dict())
    if report:
        r.write_report(path, title=f"{model}: {fmt_bytes(budget_bytes)} at batch {batch} x context {context}")
    q, before, after = r.quality, r.estimate_before, r.estimate_after
    rows = [["recipe", r.describe(r.pick)],
            ["memory (estimate)", f"{fmt_bytes(before.total)} -> {fmt_bytes(after.total)} (budget {fmt_bytes(budget_bytes)})"]]
    sm = r.summary()
    if sm["verified_perplexity_change"] is not None:
        rows.append(["perplexity change of the pick", f"predicted {100 * sm['predicted_perplexity_change']:+.2f}%, "
                     f"verified {100 * sm['verified_perplexity_change']:+.2f}% ({sm['sensitivity']['signal']} "
                     f"sensitivities, {sm['sensitivity']['evaluations']} evaluations)"])
    if r.measured:
        rows.append(["measured peak", f"{fmt_bytes(r.measured['peak'])} on {r.measured['device']}"])
    if q:
        rows.append(["held-out perplexity", f"{q['perplexity_original']:.3f} -> {q['perplexity']:.3f} "
                                            f"({100 * q['perplexity_increase']:+.2f}%)"])
        if "bleu4" in q:
            rows.append(["BLEU-4 vs original", f"{q['bleu4']:.1f}"])
    rows.append(["written", f"{path} (model, recipe.json" + (", report.md, report.html)" if report else ")")])
    console.print(table(f"{model} -> {path} ({time.perf_counter() - t0:.0f} s)", ["", ""], rows))


def run_recipe(model: str, out: Path, *, recipe: Path, device: str, dtype: str, overwrite: bool = False) -> None:
    from ..auto import apply_recipe, load_recipe, save_recipe
    from ..memory.estimate import estimate_memory

    rec = load_recipe(recipe)
    dev = pick_device(device)
    hub.check_output_dir(out, overwrite=overwrite, what="--out")
    t0 = time.perf_counter()
    m = hub.from_pretrained(model, dtype=dtype, device=dev)
    tok = hub.load_tokenizer(model)
    before = model_bytes(m)
    kv = apply_recipe(m, rec)
    path = hub.save_pretrained(m, out, tokenizer=tok, overwrite=overwrite)
    save_recipe(rec, Path(path) / "recipe.json")
    rows = [["weights", fmt_bytes(before), fmt_bytes(model_bytes(m))],
            ["KV cache", "", kv.label() if kv else "full precision"]]
    tgt = rec.get("target") or {}
    if tgt.get("context") and tgt.get("batch"):
        kv_dtype = None if kv is None or kv.bits is None else list(kv.bits) if isinstance(kv.bits, tuple) else f"int{kv.bits}"
        est = estimate_memory(m, batch=tgt["batch"], seq_len=tgt["context"], kv_dtype=kv_dtype, device=tgt.get("device"))
        rows.append([f"inference estimate at batch {tgt['batch']} x context {tgt['context']}", "", fmt_bytes(est.total)])
    console.print(table(f"{model} -> {path}: recipe {recipe} replayed ({time.perf_counter() - t0:.1f} s)",
                        ["", "before", "after"], rows))
