"""Never silent: what a quantization left in full precision, each big tensor with the reason.

After :func:`~openautoglm.quant.quantize` (or quantize-on-load) every floating-point parameter that is not part of a
quantized module and holds more than :data:`SHARE` of the model's bytes is listed in
``QuantResult.full_precision`` (and in ``openautoglm compress``'s summary) with why it stayed: skipped by the selector
(the shape), excluded by the patterns, the input embedding (a lookup table), a tied ``lm_head``, a router -- or a
parameter of a layout openautoglm has no quantized form for, which is logged as a warning: such a tensor is the
silent gap of a Linear-only quantizer (transformers' fused MoE experts were one).
"""

from __future__ import annotations

import logging

from torch import nn

from .. import _hf
from .._util.modules import model_bytes, tied_names
from .config import QuantConfig

log = logging.getLogger(__name__)
SHARE = 0.01  # report float parameters above this share of the model's bytes


def _quantized(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("openautoglm.quant")


def full_precision(model: nn.Module, config: QuantConfig, skipped: dict[str, str], share: float = SHARE
                   ) -> dict[str, dict]:
    """``{parameter name: {"bytes", "share", "reason"}}`` for the float parameters above ``share`` of the model's
    bytes that are not inside a quantized module (see the module docstring)."""
    total = max(1, model_bytes(model))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = tied_names(model)
    routers = set()
    try:
        for layer in _hf.decoder_layers(model):
            block = _hf.moe.moe_block(layer)
            r = _hf.moe.router_of(block) if block is not None else None
            if r is not None:
                routers.add(id(r))
    except TypeError:
        pass
    out: dict[str, dict] = {}
    seen: set[int] = set()
    inside = None
    for mname, mod in model.named_modules():
        if inside is not None and mname.startswith(inside):
            continue
        inside = None
        if _quantized(mod) and mname:
            inside = mname + "."
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            b = p.numel() * p.element_size()
            if b <= share * total:
                continue
            name = f"{mname}.{pname}" if mname else pname
            out[name] = {"bytes": b, "share": round(b / total, 4),
                         "reason": _reason(mname, mod, p, config, skipped, emb, head, tied, routers)}
    return out


def _reason(mname, mod, p, config, skipped, emb, head, tied, routers) -> str:
    if mname in skipped:
        return f"skipped: {skipped[mname]}"
    if emb is not None and p is getattr(emb, "weight", None):
        extra = " (the lm_head is tied to it)" if tied else ""
        return f"input embedding: a lookup table (one row read per token), not a matmul; not quantized{extra}"
    if id(mod) in routers:
        return "router: kept in full precision (it chooses each token's experts)"
    if _hf.is_linear_like(mod) or _hf.moe.is_experts(mod):
        if mname in tied:
            return "weight tied to the input embeddings"
        if not config.matches(mname):
            what = "lm_head" if mod is head else "layer"
            return (f"{what} not selected by the patterns (include={list(config.include)}, "
                    f"exclude={list(config.exclude)})")
        return "not quantized by this call"
    return (f"a {tuple(p.shape)} parameter of {type(mod).__name__}, a layout openautoglm has no quantized form for")


def log_full_precision(report: dict[str, dict]) -> None:
    for name, r in report.items():
        known = r["reason"].startswith(("input embedding", "router", "lm_head", "weight tied", "skipped", "layer not"))
        (log.info if known else log.warning)("left in full precision: %s (%.1f%% of the bytes): %s", name,
                                             100 * r["share"], r["reason"])
