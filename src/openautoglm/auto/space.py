"""The search space of :func:`compress_to_budget` and the bytes of every choice in it.

A candidate is: a head-pruning level (global Taylor ranking, whole GQA groups, so the KV cache shrinks too), one
weight option per *unit* (the attention or the MLP Linears of one decoder layer, the routed experts of a MoE layer,
and an untied ``lm_head``) and
one KV width per decoder layer. Its memory is additive over those choices plus a few constants, so the bytes of
each choice are computed once per pruning level from the estimator's own pieces (a meta-device model with the
quantized modules swapped in, ``estimate._kv_bytes`` per layer, ``mixed.quantized_linear_workspace``); the
sum equals ``estimate_memory(...)`` of the assembled recipe exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _hf
from ..memory import estimate as E
from ..memory import mixed
from ..memory.shapes import model_shape
from ..quant.api import empty_quantized, supports
from ..quant.config import QuantConfig

BUDGET_TERMS = ("weights", "kv_cache", "activations", "logits", "workspace")


@dataclass(frozen=True)
class WeightOption:
    """One storage format for a unit's Linears: ``scheme`` None keeps them in the model dtype."""

    name: str
    scheme: str | None = None
    group_size: int | None = None

    def config(self, include: list[str]) -> QuantConfig | None:
        if self.scheme is None:
            return None
        return QuantConfig(scheme=self.scheme, group_size=self.group_size, include=tuple(include), exclude=())


WEIGHT_OPTIONS = {o.name: o for o in (
    WeightOption("bf16"), WeightOption("w8", "w8"), WeightOption("w8a8", "w8a8"),
    WeightOption("w4g128", "w4", 128), WeightOption("w4g64", "w4", 64), WeightOption("w4g32", "w4", 32),
)}
KV_OPTIONS = (None, 8, 4, 2)
PRUNE_LEVELS = (0.0, 0.125, 0.25, 0.375, 0.5)


@dataclass(frozen=True)
class Unit:
    """Modules compressed together: ``kind`` "attn" / "mlp" (Linears) or "experts" (the routed experts of a MoE
    layer, chosen separately from the layer's attention and shared experts) of decoder layer ``layer``, or "head"
    (lm_head). ``includes``: the recipe's include patterns when ``pattern`` alone would also select another unit's
    modules (a MoE layer's ``mlp.*`` holds its experts)."""

    name: str
    layer: int
    kind: str
    pattern: str
    modules: tuple[str, ...]
    includes: tuple[str, ...] = ()

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.includes or (self.pattern,)


def find_units(model: nn.Module) -> list[Unit]:
    """Attention and MLP Linears of each decoder layer (and its routed experts, a unit of their own), then an untied
    ``lm_head`` (a tied one stays float)."""
    names = {id(m): n for n, m in model.named_modules()}
    units = []
    for i, layer in enumerate(_hf.decoder_layers(model)):
        prefix = names[id(layer)]
        for child, sub in layer.named_children():
            lins = tuple(f"{prefix}.{child}.{n}" for n, m in sub.named_modules() if isinstance(m, nn.Linear))
            experts = tuple(f"{prefix}.{child}.{n}" for n, m in sub.named_modules() if _hf.moe.is_experts(m))
            kind = {"self_attn": "attn", "attn": "attn", "mlp": "mlp"}.get(child, child)
            if lins:
                units.append(Unit(f"layers.{i}.{kind}", i, kind, f"{prefix}.{child}.*", lins,
                                  includes=lins if experts else ()))
            for e in experts:
                units.append(Unit(f"layers.{i}.experts", i, "experts", e, (e,)))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(out, nn.Linear) and (emb is None or out.weight is not emb.weight):
        units.append(Unit("lm_head", -1, "head", names[id(out)], (names[id(out)],)))
    return units


@dataclass
class LevelTables:
    """Bytes of every choice at one pruning level (the serving dtype, ``batch`` x ``context``).

    weights[u][o] : bytes of unit ``u`` stored as weight option ``o`` (None when the option does not apply)
    workspace[u][o] : prefill transient of that choice (``mixed.quantized_linear_workspace``; 0 for float)
    kv[l][b] : KV bytes of layer ``l`` at width ``b`` (index into ``KV_OPTIONS``)
    other_weights : weights outside the units (embeddings, norms, buffers)
    body, head : the estimator's two prefill moments without weights and KV: ``{"activations", "logits"}`` at
        the decoder layers (where decoder units' workspace adds) and at ``lm_head`` (where its unit's adds)
    head_unit : index of the lm_head unit, or None
    """

    ratio: float
    removed: dict[int, list[int]]
    weights: list[list[int | None]]
    workspace: list[list[int]]
    kv: list[list[int]]
    other_weights: int
    body: dict[str, int]
    head: dict[str, int]
    head_unit: int | None = None
    level: int = 0                     # index of the pruning level in the sensitivities
    method: str = "none"               # "none", "taylor" (the library's head pruner) or "measured" (per-layer costs)

    def peak_terms(self, weights: int, kv: int, ws_body: int, ws_head: int) -> dict[str, int]:
        """The estimator's terms at the larger of the two moments (ties: the decoder layers, as it does)."""
        b = self.body["activations"] + self.body["logits"] + ws_body
        h = self.head["activations"] + self.head["logits"] + ws_head
        at = dict(self.body, workspace=ws_body) if b >= h else dict(self.head, workspace=ws_head)
        return {"weights": weights, "kv_cache": kv, **at}


def _module_bytes(mod: nn.Module, opt: WeightOption) -> int | None:
    if opt.scheme is None:
        return E.model_bytes(mod)
    cfg = QuantConfig(scheme=opt.scheme, group_size=opt.group_size)
    if supports(mod, cfg) is not None:
        return None
    return E.model_bytes(empty_quantized(mod, cfg, device="meta"))


def _workspace(mod: nn.Module, scheme: str, rows: int, cb: int, cuda: bool) -> int:
    """Prefill transient of ``mod`` quantized with ``scheme`` (a Linear, or a stack of experts per projection)."""
    if _hf.moe.is_experts(mod):
        e, h, i = _hf.moe.sizes(mod)
        up = int(_hf.moe.weight_out_in(mod, "up").shape[1])
        return max(mixed.experts_workspace(scheme, h, e * up, e, cb, cuda),
                   mixed.experts_workspace(scheme, i, e * h, e, cb, cuda))
    return mixed.quantized_linear_workspace(scheme, rows, mod.in_features, mod.out_features, cb, cuda)


def level_tables(meta: nn.Module, units: list[Unit], options: list[WeightOption], kv_options, *, ratio: float,
                 removed: dict[int, list[int]], batch: int, context: int, group: int, residual: int | str,
                 cuda: bool = True, level: int = 0, method: str = "none") -> LevelTables:
    """Byte tables of ``meta`` (a meta-device model in the serving dtype, already pruned to this level)."""
    dtype = next(p.dtype for p in meta.parameters() if p.is_floating_point())
    cb = E.dtype_bytes(dtype)
    T = batch * context
    W, WS = [], []
    rows_of = {"head": batch}  # lm_head computes the last position's logits only (generate)
    unit_float = 0
    for u in units:
        mods = [meta.get_submodule(n) for n in u.modules]
        row, ws = [], []
        for o in options:
            sizes = [_module_bytes(m, o) for m in mods]
            row.append(None if any(s is None for s in sizes) else sum(sizes))
            ws.append(0 if o.scheme is None else max(_workspace(m, o.scheme, rows_of.get(u.kind, T), cb, cuda)
                                                     for m in mods))
        W.append(row)
        WS.append(ws)
        unit_float += sum(E.model_bytes(m) for m in mods)
    shape = model_shape(meta)
    est = E.estimate_memory(shape, mode="inference", batch=batch, seq_len=context, kv_residual=residual,
                            kv_group_size=group)
    full = "bf16" if dtype == torch.bfloat16 else ("fp16" if dtype == torch.float16 else "fp32")
    kv = [[E._kv_bytes([L], context, batch, full if b is None else f"int{b}", int(cb), group, residual)
           for b in kv_options] for L in shape.layers]
    wk = est.terms["weights"] + est.terms["kv_cache"]
    lg = batch * shape.vocab * int(cb)  # the last position's logits (generate)
    body = {"activations": est.phases["prefill: decoder layers"] - wk, "logits": 0}
    head = {"activations": est.phases["prefill: lm_head"] - wk - lg, "logits": lg}
    head_unit = next((i for i, u in enumerate(units) if u.kind == "head"), None)
    return LevelTables(ratio, removed, W, WS, kv, est.terms["weights"] - unit_float, body, head, head_unit, level, method)
