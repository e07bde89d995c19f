"""``AutoResult``: what :func:`compress_to_budget` chose, what it compared it with, and what it measured."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..memory.estimate import MemoryEstimate
from .recipe import kv_config_of
from .report import write_report
from .search import Candidate
from .sensitivity import Sensitivities
from .space import Unit


@dataclass
class AutoResult:
    recipe: dict
    budget: int
    fit: int                           # budget less the headroom: what the search fitted
    context: int
    batch: int
    budget_terms: tuple
    pick: Candidate
    auto: list[Candidate]              # knapsack optimum per pruning level under the budget
    uniform: list[Candidate]           # every single uniform recipe (fitting or not)
    front: list[Candidate]             # knapsack optima over a sweep of budgets (the trade-off curve)
    shortlist: list[Candidate]         # measured together on the calibration text
    smallest: Candidate
    units: list[Unit]
    options: list[str]
    kv_options: list
    sensitivities: Sensitivities
    estimate_before: MemoryEstimate
    estimate_after: MemoryEstimate
    quality: dict
    measured: dict | None
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    verify_base_nll: float | None = None  # the original's NLL on the verification text (None: the calibration's)
    verify_tokens: int | None = None
    selection: str = ""                   # why the pick was chosen among the verified candidates

    @property
    def kv_config(self):
        return kv_config_of(self.recipe)

    def describe(self, c: Candidate) -> str:
        """``"w4g64 x 10, w8 x 6; KV int4 x 5, int8 x 3; prune 0.125"``."""
        w = Counter(self.options[o] for o in c.weights)
        kv = Counter("bf16" if self.kv_options[b] is None else f"int{self.kv_options[b]}" for b in c.kv)
        text = ", ".join(f"{k} x {n}" for k, n in w.most_common()) + "; KV " + ", ".join(
            f"{k} x {n}" for k, n in kv.most_common())
        return text + (f"; prune {self.sensitivities.level_name(c.level)}" if c.ratio else "")

    def perplexity(self, c: Candidate, measured: bool = True) -> float:
        """A candidate's perplexity: measured on the verification text if it was verified (and ``measured``),
        else predicted on the calibration text by the additive model."""
        if measured and c.measured is not None:
            base = self.sensitivities.base_nll if self.verify_base_nll is None else self.verify_base_nll
            return math.exp(base + c.measured)
        return math.exp(self.sensitivities.base_nll + c.predicted)

    def best_uniform(self) -> Candidate | None:
        fit = [c for c in self.uniform if c.bytes <= self.fit]
        return min(fit, key=lambda c: c.predicted) if fit else None

    def summary(self) -> dict:
        q = self.quality
        return {
            "budget": self.budget, "context": self.context, "batch": self.batch, "budget_terms": list(self.budget_terms),
            "pick": self.describe(self.pick), "estimated_bytes": self.pick.bytes,
            "estimated_terms": self.pick.terms, "measured": self.measured,
            "verification_perplexity": self.perplexity(self.pick), "verification_tokens": self.verify_tokens,
            "selection": self.selection,
            "heldout_perplexity": q.get("perplexity"),
            "heldout_perplexity_original": q.get("perplexity_original"), "bleu4": q.get("bleu4"),
            "attention_cosine": q.get("attention_cosine"), "seconds": self.seconds, "notes": self.notes,
            "predicted_perplexity_change": math.expm1(self.pick.predicted),
            "verified_perplexity_change": None if self.pick.measured is None else math.expm1(self.pick.measured),
            "sensitivity": {"signal": self.sensitivities.signal, "evaluations": self.sensitivities.evaluations,
                            "seconds": self.sensitivities.seconds, "scales": self.sensitivities.scales,
                            "cached": self.sensitivities.cached},
        }

    def to_dict(self) -> dict:
        def cand(c: Candidate) -> dict:
            return {"kind": c.kind, "label": c.label or self.describe(c), "ratio": c.ratio,
                    "pruning": self.sensitivities.level_name(c.level), "bytes": c.bytes,
                    "predicted_nll_increase": c.predicted, "measured_nll_increase": c.measured,
                    "weights": [self.options[o] for o in c.weights],
                    "kv": [self.kv_options[b] for b in c.kv], "terms": c.terms}

        return {**self.summary(), "recipe": self.recipe, "quality": self.quality,
                "units": [u.name for u in self.units], "pick_detail": cand(self.pick),
                "shortlist": [cand(c) for c in self.shortlist], "smallest": cand(self.smallest),
                "uniform": [cand(c) for c in self.uniform], "front": [cand(c) for c in self.front],
                "sensitivities": {"base_nll": self.sensitivities.base_nll,
                                  "weight": self.sensitivities.weight, "kv": self.sensitivities.kv,
                                  "prune": {self.sensitivities.level_name(i): v
                                            for i, v in enumerate(self.sensitivities.prune)},
                                  "prune_removed": {self.sensitivities.level_name(i): v
                                                    for i, v in enumerate(self.sensitivities.removed)},
                                  "layer_prune": self.sensitivities.layer_prune,
                                  "calibration": self.sensitivities.calibration, "cached": self.sensitivities.cached},
                "estimate_before": self.estimate_before.to_dict(), "estimate_after": self.estimate_after.to_dict()}

    def write_report(self, out_dir, title: str | None = None) -> Path:
        """Write ``report.md``, ``report.html`` (plots embedded) and the PNGs into ``out_dir``; returns the md path."""
        return write_report(self, Path(out_dir), title=title)
