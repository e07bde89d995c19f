"""``compress_to_budget(model, "12GiB", context=16384, batch=4)``: the least lossy recipe that fits, applied.

1. measure single-change sensitivities on calibration text (:mod:`.sensitivity`, cached on disk), per-layer
   head-pruning costs included (:mod:`.pruning`); for the search they are clamped at 0 and made monotone in bits;
2. byte tables of every choice from the estimator's pieces, per pruning level (:mod:`.space`);
3. the knapsack optimum per pruning level under the budget, every uniform recipe, and the trade-off curve
   (:mod:`.search`, :mod:`.plan`); nothing fits -> :class:`BudgetError` naming the smallest budget that does;
4. the ``top_k`` best-predicted candidates that fit (mixed recipes and the best uniform ones) measured together on
   *fresh* verification text, as decoded through their cache; the lowest measured NLL is the pick, but a mixed
   recipe must beat the best uniform one by more than ``pick_margin`` standard errors (:func:`.plan.choose`);
5. the pick applied in place (:func:`.recipe.apply_recipe`), its memory re-estimated and measured, and its
   quality checked against the original on held-out text (:mod:`.quality`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluate import heldout_prompts, heldout_token_ids
from ..hub import load_tokenizer
from ..kv.config import KVCacheConfig
from ..memory.estimate import estimate_memory
from ..prune.heads import mask_heads
from . import quality, search
from .budget import parse_budget
from .plan import choose, plan
from .plan import shortlist as plan_shortlist
from .recipe import apply_recipe, make_recipe
from .result import AutoResult
from .sensitivity import measure, nll_windows, swapped
from .space import BUDGET_TERMS, KV_OPTIONS, PRUNE_LEVELS, WEIGHT_OPTIONS, find_units

log = logging.getLogger(__name__)
DEFAULT_SCHEMES = ("bf16", "w8", "w4g128", "w4g64", "w4g32")
# w8a8 stores the same int8 weight codes as w8 with fp32 instead of 16-bit scales and adds activation rounding
# and a large int8-GEMM prefill transient: it never wins on memory or quality, only (on some GPUs) on speed.
DOMINATED = {"w8a8": "w8"}
# Compressions of the library the search leaves out, and why (said in every report, never silently).
NOT_SEARCHED = (
    "Not searched: unstructured and 2:4 sparsity -- stored dense they save no memory; stored sparse (2:4 "
    "semi-structured, GPU only) they keep 9/16 of the 16-bit bytes, more than w8's ~1/2, at a larger quality cost "
    "(bundled model: 2:4 Wanda perplexity 23.4 vs 15.5), so w8 dominates them; low-rank projections (-20% of the "
    "parameters cost +13% perplexity on the bundled model, w8 saves 50% for ~0%); cross-layer KV sharing -- "
    "what it frees depends on how similar adjacent layers' keys are at run time, which the estimator cannot "
    "promise in advance (and on the bundled model no adjacent layers are similar enough to share)."
)


def _token_ids(tokenizer, text: str | None, part: str) -> torch.Tensor:
    ids = heldout_token_ids(tokenizer, text)
    if text is None:  # bundled held-out text: calibrate on its second half, evaluate on its first
        half = ids.numel() // 2
        ids = ids[half:] if part == "calib" else ids[:half]
    return ids


def _windows(ids: torch.Tensor, tokens: int, seq: int, what: str) -> torch.Tensor:
    n = min(tokens, ids.numel()) // seq
    if n < 1:
        raise ValueError(f"{what} text has {ids.numel()} tokens, fewer than one window of {seq}")
    return ids[: n * seq].view(n, seq)


def _spread_windows(ids: torch.Tensor, tokens: int, seq: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``tokens // seq`` calibration windows spread evenly over ``ids`` (more documents than a contiguous run),
    and verification windows spread over the slots left (None when none are left). Shapes ``(n, seq)``."""
    slots = ids.numel() // seq
    if slots < 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq}")
    all_w = ids[: slots * seq].view(slots, seq)
    n = max(1, min(tokens // seq, slots))
    pick = sorted({round(i * (slots - 1) / max(n - 1, 1)) for i in range(n)}) if n > 1 else [0]
    rest = [i for i in range(slots) if i not in set(pick)]
    return all_w[pick], (all_w[rest] if rest else None)


def _verify_windows(rest: torch.Tensor, tokens: int) -> torch.Tensor:
    n = max(1, min(tokens // rest.shape[1], rest.shape[0]))
    idx = sorted({round(i * (rest.shape[0] - 1) / max(n - 1, 1)) for i in range(n)}) if n > 1 else [0]
    return rest[idx]


def candidate_recipe(c: search.Candidate, units, options, kv_options, removed, *, kv_group, kv_residual,
                     prune_method: str = "taylor", **target) -> dict:
    """The recipe (list of configs) of candidate ``c``; ``removed``: its level's query heads per layer."""
    steps = []
    if removed:
        how = ("taylor: global ranking of GQA groups" if prune_method == "taylor" else
               "measured: the split over layers with the least summed per-layer NLL cost (groups in Taylor order)")
        steps.append({"type": "prune_heads", "removed": {str(k): v for k, v in sorted(removed.items())},
                      "ratio": c.ratio, "selection": how, "granularity": "kv_group"})
    by_opt: dict[int, list[str]] = {}
    for u, o in zip(units, c.weights):
        if options[o].scheme is not None:
            by_opt.setdefault(o, []).extend(u.patterns)
    for o, pats in sorted(by_opt.items()):
        steps.append({"type": "quantize", "config": options[o].config(pats).to_dict()})
    bits = [kv_options[b] for b in c.kv]
    if any(b is not None for b in bits):
        kv = KVCacheConfig(bits=tuple(bits), group_size=kv_group, residual_length=kv_residual)
        steps.append({"type": "kv_cache", "config": kv.to_dict()})
    return make_recipe(steps, target=target)


@contextlib.contextmanager
def _applied(model, c: search.Candidate, units, options, removed):
    """The candidate's weights and head masks applied to ``model`` inside the block (undone after)."""
    plan = {n: options[o] for u, o in zip(units, c.weights) for n in u.modules}
    with swapped(model, plan), mask_heads(model, removed):  # masks hook the o_proj in place (quantized or not)
        yield model


def _measuring_copy(model: nn.Module, measure_dtype, dev: torch.device) -> nn.Module:
    """``model`` itself, or a copy in the dtype the quality signals are measured in (see ``measure_dtype``)."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if measure_dtype == "auto":
        measure_dtype = torch.float32 if dev.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else None
    if measure_dtype is None or measure_dtype == dtype:
        return model
    if not isinstance(measure_dtype, torch.dtype) or not measure_dtype.is_floating_point:
        raise ValueError(f"measure_dtype={measure_dtype!r}; accepted: 'auto', None or a floating torch dtype")
    return copy.deepcopy(model).to(measure_dtype)


def compress_to_budget(model: nn.Module, budget, *, context: int, batch: int = 1, tokenizer=None,
                       calib_text: str | None = None, calib_tokens: int = 4096, eval_text: str | None = None,
                       eval_tokens: int = 8192, schemes=DEFAULT_SCHEMES, kv_bits=KV_OPTIONS, prune_ratios=PRUNE_LEVELS,
                       budget_terms=BUDGET_TERMS, headroom: float = 0.03, device: str | None = None,
                       top_k: int = 5, verify_tokens: int = 8192, pick_margin: float = 2.0, kv_group_size: int = 64, kv_residual: int | str = "auto",
                       measure_dtype="auto", verify: bool = True, measure_memory: bool = True, n_prompts: int = 4,
                       new_tokens: int = 48, cache_dir=None, use_cache: bool = True, progress: bool = True,
                       sensitivity: str = "fisher", time_limit: float | None = None) -> AutoResult:
    """Compress ``model`` in place to the recipe with the least quality loss whose inference memory at
    ``batch`` x ``context`` fits ``budget``; returns an :class:`AutoResult` (recipe, candidates, report data).

    Parameters
    ----------
    budget : ``"12GiB"``, ``"512MB"``, a number of bytes, or ``"auto"`` (free memory of the model's GPU).
    context, batch : the serving shape: KV cache of ``context`` tokens for ``batch`` sequences, prefill peak.
    tokenizer : needed for text (default: the tokenizer of the folder the model was loaded from).
    calib_text, eval_text : calibration / held-out text (default: the bundled held-out text's second / first half).
    calib_tokens, eval_tokens : tokens of each used (windows of ``min(context, model context, 2048)``); the
        calibration windows are spread evenly over the calibration text (more documents than a contiguous run).
    schemes : weight options per unit: bf16, w8, w8a8, w4g128, w4g64, w4g32.
    kv_bits : KV widths per layer (None = full precision, 8, 4, 2).
    prune_ratios : fractions of GQA groups removed; each is searched twice, as the library's head pruner removes it
        (global Taylor ranking) and split over the layers by measured per-layer costs (:mod:`.pruning`).
    budget_terms : which estimator terms must fit (default all: weights, kv_cache, activations, logits, workspace).
    headroom : fraction of the budget kept free (allocator fragmentation, the estimator's error); the search
        fits ``budget * (1 - headroom)``.
    device : ``"cuda"`` or ``"cpu"``: where the model will serve (quantized layers' prefill transients differ);
        default: where ``model`` is.
    top_k : candidates verified together before the pick: the best-predicted mixed recipes and (up to two) the
        best-predicted uniform recipes that fit.
    pick_margin : a mixed recipe is picked over the best verified uniform one only when it beats it by more than
        this many standard errors of their paired per-window difference on the verification text.
    verify_tokens : tokens of the verification text: the calibration text after the ``calib_tokens`` the
        signals were measured on (fresh text: picking on the signals' own text would reward their noise).
    measure_dtype : dtype of the sensitivity and verification forwards: ``"auto"`` = float32 for a half-precision
        model on the CPU (a float32 copy: bf16 rounding noise in two forwards is as large as a layer's signal),
        else the model's own; or a torch dtype / None (the model's).
    verify, measure_memory : held-out quality against the original, and the measured peak, for the report.
    sensitivity : how the single-change costs are obtained (:func:`.sensitivity.measure`): ``"fisher"`` (default:
        predicted from one forward/backward pass per calibration window, calibrated by about ten evaluations)
        or ``"measured"`` (one evaluation per unit x option, layer x KV width, layer x groups: the reference,
        hours on a CPU for a 100M+ model).
    time_limit : seconds for the whole call: once spent, the shortlist's verification stops (the best uniform
        recipe and the best-predicted mixed one are always verified), the held-out comparison and the memory
        measurement are skipped, and the best recipe verified so far is applied (said in ``notes``).
    """
    t_start = time.perf_counter()
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or time_limit <= 0):
        raise ValueError(f"time_limit={time_limit!r} must be a positive number of seconds")

    def out_of_time() -> bool:
        return time_limit is not None and time.perf_counter() - t_start > time_limit

    dev = next(model.parameters()).device
    budget_bytes = parse_budget(budget, device=dev)
    for name, v in (("context", context), ("batch", batch), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0.0 <= headroom < 0.5:
        raise ValueError(f"headroom={headroom!r} must be a fraction in [0, 0.5)")
    device = device or dev.type
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}; accepted: cuda, cpu")
    terms = tuple(budget_terms)
    if not terms or set(terms) - set(BUDGET_TERMS):
        raise ValueError(f"budget_terms={budget_terms!r}; accepted: a non-empty subset of {BUDGET_TERMS}")
    names = list(dict.fromkeys(["bf16", *schemes]))
    bad = [n for n in names if n not in WEIGHT_OPTIONS]
    if bad:
        raise ValueError(f"unknown weight options {bad}; accepted: {', '.join(WEIGHT_OPTIONS)}")
    kv_options = list(dict.fromkeys([None, *kv_bits]))
    if any(b not in KV_OPTIONS for b in kv_options):
        raise ValueError(f"kv_bits={kv_bits!r}; accepted: None (full precision), 8, 4, 2")
    ratios = sorted({0.0, *[float(r) for r in prune_ratios]})
    if any(not 0.0 <= r < 1.0 for r in ratios):
        raise ValueError(f"prune_ratios={prune_ratios!r} must lie in [0, 1)")
    notes = [f"{n} not searched: dominated by {DOMINATED[n]} (same int8 weight codes, more bytes, activation "
             "rounding, larger prefill transient); ask for it alone if you need its GEMM" for n in names
             if n in DOMINATED and DOMINATED[n] in names]
    notes.append(NOT_SEARCHED)
    names = [n for n in names if not (n in DOMINATED and DOMINATED[n] in names)]
    options = [WEIGHT_OPTIONS[n] for n in names]
    if tokenizer is None:
        src = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if not src:
            raise ValueError("compress_to_budget needs tokenizer= (the model does not say where it was loaded from)")
        tokenizer = load_tokenizer(src)
    seq = min(context, int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)
    calib, rest = _spread_windows(_token_ids(tokenizer, calib_text, "calib"), calib_tokens, seq)
    if rest is not None:  # verify on text the signals were not measured on (no selection bias)
        check = _verify_windows(rest, verify_tokens)
    else:
        check = calib
        notes.append(f"the calibration text has no tokens beyond the {calib.numel()} the signals used: the shortlist "
                     "was verified on the same text (give a longer calib_text to verify on fresh text)")
    eval_ids = _windows(_token_ids(tokenizer, eval_text, "eval"), eval_tokens, seq, "evaluation").reshape(-1)
    units = find_units(model)

    work = _measuring_copy(model, measure_dtype, dev)
    sens = measure(work, calib, units, options, kv_options, ratios, kv_group=kv_group_size, kv_residual=kv_residual,
                   cache=cache_dir, use_cache=use_cache, progress=progress, method=sensitivity)
    log.info("sensitivities (%s): %d evaluations, %.0f s%s", sens.signal, sens.evaluations, sens.seconds,
             " (from the cache)" if sens.cached else "")
    signals = sens.denoised()
    p = plan(model, signals, units, options, kv_options, budget_bytes, context=context, batch=batch, terms=terms,
             headroom=headroom, device=device, kv_group=kv_group_size, kv_residual=kv_residual)
    auto, uniform, front, smallest = p.auto, p.uniform, p.front, p.smallest
    n_uniform = min(2, top_k - 1)
    shortlist = plan_shortlist(p, signals, terms, n_auto=top_k - n_uniform, n_uniform=n_uniform)
    # verification order: the best uniform recipe and the best-predicted mixed one first (a time limit keeps them)
    firsts = [c for c in (min((c for c in shortlist if c.kind == "uniform"), key=lambda c: c.predicted, default=None),
                          min((c for c in shortlist if c.kind != "uniform"), key=lambda c: c.predicted, default=None))
              if c is not None]
    shortlist = firsts + sorted((c for c in shortlist if c not in firsts), key=lambda c: c.predicted)
    t_search = time.perf_counter()
    removed_of = sens.removed
    t0 = time.perf_counter()
    check_base_w = nll_windows(work, check)
    check_base = float(check_base_w.mean())
    per_eval = time.perf_counter() - t0
    log.info("verifying %d candidates on %d fresh tokens: about %.0f s (%.1f s per candidate)", len(shortlist),
             check.numel(), per_eval * len(shortlist), per_eval)
    per_window = {}
    verified = []
    for c in tqdm(shortlist, desc="verifying", unit="recipe", disable=not progress):  # together, through each cache
        if len(verified) >= len(firsts) and out_of_time():
            notes.append(f"time limit of {time_limit:g} s reached: {len(shortlist) - len(verified)} of "
                         f"{len(shortlist)} short-listed candidates were not verified")
            break
        verified.append(c)
        bits = tuple(kv_options[b] for b in c.kv)
        kv = KVCacheConfig(bits=bits, group_size=kv_group_size, residual_length=kv_residual)
        with _applied(work, c, units, options, removed_of[c.level]):
            per_window[c.key()] = nll_windows(work, check, kv) - check_base_w
        c.measured = float(per_window[c.key()].mean())
        log.info("verified %s: predicted %+.4f, measured %+.4f nats", c.label or c.kind, c.predicted, c.measured)
    shortlist = verified
    pick, why = choose(shortlist, per_window, pick_margin)
    log.info("pick: %s", why)
    del work
    target = {"budget": budget_bytes, "context": context, "batch": batch, "budget_terms": list(terms),
              "headroom": headroom, "device": device}
    recipe = candidate_recipe(pick, units, options, kv_options, removed_of[pick.level], kv_group=kv_group_size,
                              kv_residual=kv_residual, prune_method=sens.method(pick.level), **target)
    recipe["predicted"] = {"bytes": pick.bytes, "nll_increase": pick.measured,
                           "verification_perplexity": math.exp(check_base + pick.measured)}
    before = estimate_memory(model, mode="inference", batch=batch, seq_len=context, kv_group_size=kv_group_size,
                             kv_residual=kv_residual, device=device)
    if verify and out_of_time():
        notes.append("time limit reached: the held-out comparison with the original and the memory measurement "
                     "were skipped; the pick's verified figure is its NLL on the verification text")
        verify = measure_memory = False
    prompts = []
    if verify and n_prompts:
        prompts = heldout_prompts(tokenizer, n_prompts) if eval_text is None else []
    probe = dict(probe=min(32, seq // 4), probe_context=min(512, seq - min(32, seq // 4)))  # attention rows compared
    base = quality.baseline(model, tokenizer, eval_ids, seq_len=seq, prompts=prompts,
                            new_tokens=new_tokens, **probe) if verify else None
    t_apply = time.perf_counter()
    kv = apply_recipe(model, recipe)
    after = estimate_memory(model, mode="inference", batch=batch, seq_len=context, kv_group_size=kv_group_size,
                            kv_residual=kv_residual, kv_dtype=[kv_options[b] for b in pick.kv], device=device)
    got = sum(v for k, v in after.terms.items() if k in terms)
    if got != pick.bytes:
        log.warning("estimate of the applied recipe (%d B) differs from the search tables (%d B)", got, pick.bytes)
    qual = quality.compare(model, tokenizer, eval_ids, base, kv, seq_len=seq, new_tokens=new_tokens,
                           removed=removed_of[pick.level], **probe) if verify else {}
    measured = quality.measure_memory(model, kv, batch=batch, context=context) if measure_memory else None
    seconds = {"sensitivity": sens.seconds, "search_and_verify": time.perf_counter() - t_search,
               "total": time.perf_counter() - t_start, "apply_and_evaluate": time.perf_counter() - t_apply}
    return AutoResult(recipe=recipe, budget=budget_bytes, verify_base_nll=check_base, selection=why,
                      verify_tokens=int(check.numel()), fit=p.fit, context=context, batch=batch, budget_terms=terms, pick=pick,
                      auto=auto, uniform=uniform, front=front, shortlist=shortlist, smallest=smallest, units=units,
                      options=names, kv_options=kv_options, sensitivities=sens, estimate_before=before,
                      estimate_after=after, quality=qual, measured=measured, notes=notes, seconds=seconds)
