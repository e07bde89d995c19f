"""Cheap measured quality signals: how much the calibration NLL rises when *one* thing is compressed.

* weight unit ``u`` stored as option ``o`` (the real quantized modules swapped in, everything else intact):
  teacher-forced mean NLL on the calibration windows minus the unmodified model's;
* KV layer ``l`` at ``b`` bits: the NLL of a token-by-token decode through a cache quantizing only that layer,
  computed in one pass by :func:`openautoglm.kv.emulate.kivi_emulation` (equal to the real cache fed one token
  at a time);
* head pruning (whole GQA groups, the heads masked at ``o_proj``'s input): per layer, the cost of losing its
  ``k`` least important groups alone; then each pruning level of :mod:`.pruning` (the library's global Taylor
  ranking, and the split with the least summed per-layer cost) measured as a whole.

Each signal comes with its standard error between the calibration windows (measured one window at a time),
which :mod:`.denoise` uses to decide how far a unit's own figure can be trusted. Results are cached on disk as
JSON, keyed by a fingerprint of the model (config, tensor names, shapes and a strided sample of every tensor's
values), of the calibration token ids and of the settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _hf
from .._util import flags
from .._util.modules import set_module
from ..evaluate import perplexity
from ..kv.config import KVCacheConfig
from ..kv.emulate import decode_perplexity
from ..prune.heads import mask_heads
from ..quant.api import new_quantized, supports
from . import pruning
from .denoise import denoised
from .fisher import fisher_signals
from .space import Unit, WeightOption

log = logging.getLogger(__name__)


@dataclass
class Sensitivities:
    """NLL increases (nats/token) on the calibration text, each with only that one change applied."""

    units: list[str]
    options: list[str]
    kv_options: list
    ratios: list[float]                      # [level] fraction of GQA groups removed (level 0: none)
    base_nll: float                          # teacher-forced (= decode through a full-precision cache)
    weight: list[list[float]]                # [unit][option]; inf where the option does not apply
    kv: list[list[float]]                    # [layer][kv option]
    prune: list[float]                       # [level]
    removed: list[dict[int, list[int]]]      # [level] query heads removed per layer
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    methods: list[str] = field(default_factory=list)      # [level] "none", "taylor" or "measured"
    layer_prune: list[list[float]] = field(default_factory=list)  # [layer][k groups] cost of pruning it alone
    weight_se: list[list[float]] = field(default_factory=list)    # standard errors (between calibration windows)
    kv_se: list[list[float]] = field(default_factory=list)
    signal: str = "measured"                 # "fisher" (predicted, :mod:`.fisher`) or "measured" (one eval each)
    scales: dict = field(default_factory=dict)  # fisher: measured / predicted of the uniform calibration changes
    evaluations: int = 0                     # full evaluations of the calibration text spent

    def method(self, level: int) -> str:
        """How pruning level ``level`` chose its heads: "none", "taylor" or "measured" (see :mod:`.pruning`)."""
        return self.methods[level] if self.methods else ("none" if not self.removed[level] else "taylor")

    def level_name(self, level: int) -> str:
        m = self.method(level)
        return "none" if m == "none" else f"{self.ratios[level]:g} ({m})"

    def denoised(self) -> Sensitivities:
        """The costs the search uses: shrunk towards each option's mean as far as the noise demands, clamped at
        0 and monotone in bits (:func:`.denoise.denoised`)."""
        return denoised(self)

    def to_json(self) -> str:
        d = asdict(self)
        d["removed"] = [{str(k): v for k, v in r.items()} for r in self.removed]
        d["weight"] = [[None if x == float("inf") else x for x in row] for row in self.weight]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Sensitivities:
        d = json.loads(text)
        d["removed"] = [{int(k): v for k, v in r.items()} for r in d["removed"]]
        d["weight"] = [[float("inf") if x is None else x for x in row] for row in d["weight"]]
        return cls(**d)


@contextlib.contextmanager
def swapped(model: nn.Module, plan: dict[str, WeightOption]):
    """Replace the Linears named in ``plan`` by real quantized modules inside the block, then restore them."""
    originals = {}
    try:
        for name, opt in plan.items():
            if opt.scheme is None:
                continue
            lin = model.get_submodule(name)
            originals[name] = lin
            set_module(model, name, new_quantized(lin, opt.config([name])))  # a Linear, or a MoE layer's experts
        yield model
    finally:
        for name, lin in originals.items():
            set_module(model, name, lin)


# config keys that say where or how a model was loaded, not what it computes: the Python API and the CLI load
# the same checkpoint with other paths and dtypes, and must find the same cached sensitivities
_LOAD_KEYS = ("_name_or_path", "name_or_path", "torch_dtype", "dtype", "transformers_version", "_commit_hash",
              "_attn_implementation", "_attn_implementation_autoset", "use_cache")


def tensor_fingerprint(model: nn.Module) -> str:
    """sha256 of the config (less how it was loaded), every tensor's name and shape and a strided sample of its
    values as float32 (a bf16 checkpoint loaded as bf16 or float32 has the same values: the same fingerprint)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _LOAD_KEYS}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        h.update(sample.float().cpu().numpy().tobytes() if sample.is_floating_point() else sample.cpu().numpy().tobytes())
    return h.hexdigest()


def ids_hash(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    base = path or flags.cache_dir()
    return Path(base).expanduser() / "sensitivity"


def nll_windows(model: nn.Module, windows: torch.Tensor, kv: KVCacheConfig | None = None) -> torch.Tensor:
    """Mean NLL of each window of ``windows`` (n, seq_len), decoded through cache ``kv``: shape ``(n,)``."""
    return torch.tensor([nll(model, w[None], kv, batch_size=1) for w in windows], dtype=torch.float64)


def nll(model: nn.Module, windows: torch.Tensor, kv: KVCacheConfig | None = None, batch_size: int = 4) -> float:
    """Mean NLL of ``windows`` (n, seq_len) as decoded through cache ``kv`` (None: full precision)."""
    if kv is None:
        return perplexity(model, token_ids=windows.reshape(-1), seq_len=windows.shape[1], batch_size=batch_size,
                          progress=False).nll
    return decode_perplexity(model, kv, token_ids=windows.reshape(-1), seq_len=windows.shape[1],
                             batch_size=batch_size).nll


METHODS = ("fisher", "measured")


def measure(model: nn.Module, windows: torch.Tensor, units: list[Unit], options: list[WeightOption], kv_options,
            ratios, *, kv_group: int = 64, kv_residual: int | str = "auto", batch_size: int = 4,
            cache: str | os.PathLike | None = None, use_cache: bool = True, progress: bool = True,
            method: str = "fisher") -> Sensitivities:
    """Every single-change NLL increase, from the disk cache or computed by ``method``:

    * ``"fisher"`` (default): predicted from one forward/backward pass per calibration window
      (:mod:`.fisher`), then scaled per kind so that one measured uniform change of each weight option, KV
      width and the middle pruning level matches its prediction's sum (a handful of evaluations in all);
    * ``"measured"``: one full evaluation of the calibration text per unit x option, layer x KV width and
      layer x groups pruned (the module docstring) -- hours on a CPU for a 100M+ model, kept as the reference.
    """
    if method not in METHODS:
        raise ValueError(f"sensitivity method {method!r}; accepted: {', '.join(METHODS)}")
    settings = dict(units=[u.name for u in units], options=[o.name for o in options], kv=list(kv_options),
                    ratios=list(ratios), group=kv_group, residual=kv_residual,
                    device=next(model.parameters()).device.type, version=5, method=method)
    key = hashlib.sha256(json.dumps([tensor_fingerprint(model), ids_hash(windows), settings],
                                    sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir(cache) / f"{key}.json"
    if use_cache and path.is_file():
        s = Sensitivities.from_json(path.read_text())
        s.cached = True
        log.info("sensitivities loaded from %s", path)
        return s
    t0 = time.perf_counter()
    ratios = [r for r in ratios if r > 0]
    scores = pruning.taylor_scores(model, windows, batch_size) if ratios else []
    orders = pruning.group_orders(model, scores) if ratios else []
    taylor = pruning.taylor_levels(model, scores, ratios)
    max_k = pruning.max_groups_per_layer(orders, ratios)
    if method == "fisher":
        s = _fisher(model, windows, units, options, kv_options, ratios, orders, taylor, max_k, kv_group=kv_group,
                    kv_residual=kv_residual, batch_size=batch_size, progress=progress)
        s.seconds = time.perf_counter() - t0
        _save(s, path, use_cache)
        return s
    n_kv = len(kv_options)
    n_layers = max(u.layer for u in units) + 1
    total = 1 + len(units) * len(options) + n_layers * n_kv + sum(max_k) + 2 * len(ratios)
    bar = tqdm(total=total, desc="sensitivity", unit="eval", disable=not progress)

    n_win = windows.shape[0]

    def run_windows(kv=None) -> torch.Tensor:
        v = nll_windows(model, windows, kv)
        bar.update(1)
        return v

    def signal(kv=None) -> tuple[float, float]:
        """(mean NLL increase, its standard error between windows; 0 with one window)."""
        d = run_windows(kv) - base_w
        return float(d.mean()), (float(d.std(unbiased=True)) / n_win**0.5 if n_win > 1 else 0.0)

    def run(kv=None) -> float:
        return float(run_windows(kv).mean())

    base_w = run_windows()
    base = float(base_w.mean())
    weight, weight_se = [], []
    for u in units:
        row, ses = [], []
        for o in options:
            unsupported = o.scheme is not None and [
                n for n in u.modules if supports(model.get_submodule(n), o.config([n]))]
            if o.scheme is None or unsupported:
                row.append(0.0 if o.scheme is None else float("inf"))
                ses.append(0.0)
                bar.update(1)
                continue
            with swapped(model, {n: o for n in u.modules}):
                d, se = signal()
            row.append(d)
            ses.append(se)
        weight.append(row)
        weight_se.append(ses)
    kv, kv_se = [], []
    for layer in range(n_layers):
        row, ses = [], []
        for b in kv_options:
            if b is None:
                row.append(0.0)
                ses.append(0.0)
                bar.update(1)
                continue
            bits = [None] * n_layers
            bits[layer] = b
            d, se = signal(KVCacheConfig(bits=tuple(bits), group_size=kv_group, residual_length=kv_residual))
            row.append(d)
            ses.append(se)
        kv.append(row)
        kv_se.append(ses)
    layer_prune = pruning.layer_costs(model, orders, max_k, run, base)
    measured = pruning.measured_levels(orders, layer_prune, ratios)
    levels = [(0.0, "none", {})]
    for r in ratios:  # the measured split only where it differs from the Taylor ranking's
        levels += [(r, m, rem[r]) for m, rem in (("taylor", taylor), ("measured", measured))
                   if r in rem and (m == "taylor" or rem[r] != taylor.get(r))]
    prune = []
    for _, _, removed in levels:
        if not removed:
            prune.append(0.0)
            continue
        with mask_heads(model, removed):
            prune.append(run() - base)
    bar.update(bar.total - bar.n)
    bar.close()
    s = Sensitivities([u.name for u in units], [o.name for o in options], list(kv_options), [r for r, _, _ in levels],
                      base, weight, kv, prune, [rem for _, _, rem in levels],
                      {"tokens": int(windows.numel()), "seq_len": int(windows.shape[1]), "sha256": ids_hash(windows)},
                      time.perf_counter() - t0, methods=[m for _, m, _ in levels], layer_prune=layer_prune,
                      weight_se=weight_se, kv_se=kv_se, signal="measured", evaluations=total)
    _save(s, path, use_cache)
    return s


def _save(s: Sensitivities, path: Path, use_cache: bool) -> None:
    if not use_cache:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(s.to_json())
        tmp.replace(path)
    except OSError as e:  # a read-only home must not fail the search
        log.warning("could not cache sensitivities in %s: %s", path, e)


def _level_cost(layer_prune: list[list[float]], orders, removed: dict[int, list[int]]) -> float:
    """Predicted cost of a removal (per-layer predictions summed): each layer's k = groups removed there."""
    total = 0.0
    for layer, heads in removed.items():
        k = sum(1 for g in orders[layer] if set(g) <= set(heads))
        row = layer_prune[layer]
        total += row[min(k, len(row) - 1)]
    return total


def _fisher(model, windows, units, options, kv_options, ratios, orders, taylor, max_k, *, kv_group, kv_residual,
            batch_size, progress, refine_layers: int = 3) -> Sensitivities:
    """The ``"fisher"`` method of :func:`measure`: predictions from :mod:`.fisher`, put on measured ground by a
    handful of evaluations:

    * weights: one measured uniform change per scheme (the option with the largest groups on every unit) scales
      that scheme's predictions (the Fisher approximation is consistently off by a factor per scheme: 0.44 / 0.47
      for w4 g128 / g32 on the bundled model);
    * KV: one measured uniform change at the lowest width scales every width's predictions (at 8 and 4 bits a
      uniform change is within the noise of one evaluation, at 2 it is not);
    * pruning: removing a head is a large change, where a second-order expansion can miss by several times
      (the bundled model's layer 0 group: 0.19 predicted, 0.89 measured, ten times any other layer's), so the
      ``refine_layers`` layers with the largest predicted cost get their per-layer costs measured; the others keep
      their predictions (within ~1.5x of the measured ones there). Pruning levels cost the sum of their layers'.
    """
    can_prune = all(isinstance(_hf.output_projection(a), nn.Linear) for _, a in _hf.attention_modules(model))
    base, weight, weight_se, kv, kv_se, layer_prune, _ = fisher_signals(
        model, windows, units, options, kv_options, orders if can_prune else [], max_k, kv_group=kv_group,
        kv_residual=kv_residual, batch_size=1, progress=progress)
    n_layers = len(kv)
    by_scheme: dict[str, int] = {}
    for o, opt in enumerate(options):  # per scheme, the option with the largest groups (per channel: None)
        if opt.scheme is not None and (opt.scheme not in by_scheme or
                                       (options[by_scheme[opt.scheme]].group_size or 1 << 30) < (opt.group_size or 1 << 30)):
            by_scheme[opt.scheme] = o
    kv_low = min((b for b in kv_options if b is not None), default=None)
    ranked = sorted(range(n_layers), key=lambda layer: -layer_prune[layer][-1]) if can_prune and orders else []
    refine = [layer for layer in ranked[:refine_layers] if max_k[layer]]
    n_evals = 1 + len(by_scheme) + (kv_low is not None) + (sum(max_k[layer] for layer in refine) if can_prune
                                                           else sum(max_k))
    bar = tqdm(total=n_evals, desc="sensitivity (calibrating)", unit="eval", disable=not progress)
    evals = [0]

    def run(kv_cfg=None) -> float:
        v = float(nll_windows(model, windows, kv_cfg).mean())
        evals[0] += 1
        bar.update(1)
        return v

    base_m = run()
    scales: dict[str, float] = {}

    def scale_of(pred: float, got: float) -> float:
        # a measured change within the noise says nothing: keep the prediction; a wild ratio is an interaction
        return float(min(max(got / pred, 0.1), 10.0)) if pred > 1e-9 and got > 0 else 1.0

    for scheme, o in by_scheme.items():
        rows = [r for r in range(len(units)) if math.isfinite(weight[r][o])]
        with swapped(model, {n: options[o] for r in rows for n in units[r].modules}):
            got = run() - base_m
        scales[scheme] = scale_of(sum(weight[r][o] for r in rows), got)
    if kv_low is not None:
        b = kv_options.index(kv_low)
        got = run(KVCacheConfig(bits=(kv_low,) * n_layers, group_size=kv_group, residual_length=kv_residual)) - base_m
        scales["kv"] = scale_of(sum(kv[layer][b] for layer in range(n_layers)), got)
    if not can_prune:  # no o_proj Linear to hook (GPT-2's Conv1D): the per-layer costs are measured
        layer_prune = pruning.layer_costs(model, orders, max_k, run, base_m)
    else:
        for layer in refine:
            row = pruning.layer_costs(model, orders, [0] * layer + [max_k[layer]], run, base_m)[layer]
            scales[f"prune layer {layer}"] = scale_of(layer_prune[layer][-1], row[-1])
            layer_prune[layer] = row
    bar.close()
    for r in range(len(units)):
        for o, opt in enumerate(options):
            f = scales.get(opt.scheme, 1.0)
            weight[r][o] *= f
            weight_se[r][o] *= f
    f = scales.get("kv", 1.0)
    kv = [[c * f for c in row] for row in kv]
    kv_se = [[c * f for c in row] for row in kv_se]
    measured = pruning.measured_levels(orders, layer_prune, ratios)
    levels = [(0.0, "none", {})]
    for r in ratios:
        levels += [(r, m, rem[r]) for m, rem in (("taylor", taylor), ("measured", measured))
                   if r in rem and (m == "taylor" or rem[r] != taylor.get(r))]
    prune = [_level_cost(layer_prune, orders, removed) if removed else 0.0 for _, _, removed in levels]
    return Sensitivities([u.name for u in units], [o.name for o in options], list(kv_options), [r for r, _, _ in levels],
                         base_m, weight, kv, prune, [rem for _, _, rem in levels],
                         {"tokens": int(windows.numel()), "seq_len": int(windows.shape[1]), "sha256": ids_hash(windows),
                          "fisher_base_nll": base},
                         0.0, methods=[m for _, m, _ in levels], layer_prune=layer_prune, weight_se=weight_se,
                         kv_se=kv_se, signal="fisher", scales=scales, evaluations=evals[0])
