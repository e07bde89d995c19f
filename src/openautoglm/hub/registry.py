"""The transform registry: what was done to a model, recorded in its config, and how to rebuild it.

Compressed checkpoints record what was done to them in ``config.json`` under
``"openautoglm": {"version": 1, "transforms": [...]}``; each transform type has a *rebuilder* registered with
:func:`register_rebuilder` that reshapes the freshly built (empty, meta-device) model -- swap in quantized
modules, drop pruned heads -- before the saved tensors are assigned.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from torch import nn

from .. import _hf
from .plugins import load_rebuilders
from .save import _attach

META_KEY = "openautoglm"
FORMAT_VERSION = 1

Rebuilder = Callable[[nn.Module, dict], None]
_REBUILDERS: dict[str, Rebuilder] = {}


# ----------------------------------------------------------------------------- registry

def register_rebuilder(kind: str) -> Callable[[Rebuilder], Rebuilder]:
    """Register ``fn(model, spec)`` that re-applies the *structure* of transform ``kind`` to an empty model."""

    def deco(fn: Rebuilder) -> Rebuilder:
        _REBUILDERS[kind] = fn
        return fn

    return deco


def registered_transforms() -> list[str]:
    load_rebuilders()
    return sorted(_REBUILDERS)


def record_transform(model: nn.Module, kind: str, spec: dict[str, Any]) -> None:
    """Append ``{"type": kind, **spec}`` to the model config's transform log (saved in config.json).

    A model that our loader did not build also gets the atomic :func:`save_pretrained` bound here, so every
    in-place verb that records a transform saves its result atomically. The record goes on the model's own
    copy of the config (made here the first time), never on a config object other models share."""
    if not getattr(model, "_openautoglm_owns_config", False):
        _hf.own_config(model)
        model._openautoglm_owns_config = True
    meta = getattr(model.config, META_KEY, None) or {"version": FORMAT_VERSION, "transforms": []}
    meta = {"version": meta.get("version", FORMAT_VERSION), "transforms": list(meta.get("transforms", []))}
    meta["transforms"].append({"type": kind, **json.loads(json.dumps(spec))})
    setattr(model.config, META_KEY, meta)
    if not hasattr(model, "_openautoglm_source"):  # not loaded by us: bind the atomic save_pretrained too
        _attach(model, None)


def applied_transforms(model_or_config) -> list[dict]:
    cfg = getattr(model_or_config, "config", model_or_config)
    meta = getattr(cfg, META_KEY, None) or (cfg.get(META_KEY) if isinstance(cfg, dict) else None) or {}
    return list(meta.get("transforms", []))


def apply_rebuilders(model: nn.Module, transforms: list[dict], *, skip_unknown: bool = False) -> None:
    """Re-apply the structure of each recorded transform to the empty (meta) ``model``, in order.

    Raises ``KeyError`` naming an unknown transform type and the known ones, unless ``skip_unknown`` (the
    estimator prices what it cannot rebuild analytically)."""
    load_rebuilders()
    for t in transforms:
        fn = _REBUILDERS.get(t.get("type"))
        if fn is None:
            if skip_unknown:
                continue
            raise KeyError(f"transform {t.get('type')!r} is not known to this openautoglm; known: {sorted(_REBUILDERS)}")
        fn(model, t)


def unknown_transforms(transforms: list[dict]) -> list:
    """Types among ``transforms`` that no registered rebuilder handles."""
    load_rebuilders()
    return [t.get("type") for t in transforms if t.get("type") not in _REBUILDERS]
