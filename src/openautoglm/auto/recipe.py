"""Recipes: the list of configs :func:`compress_to_budget` chose, replayed exactly by :func:`apply_recipe`.

A recipe is JSON (YAML is read too when PyYAML is installed)::

    {"format": "openautoglm-recipe", "version": 1,
     "steps": [{"type": "prune_heads", "removed": {"3": [4, 5, 6, 7]}},
               {"type": "quantize", "config": {"scheme": "w4", "group_size": 64, "include": [...], ...}},
               {"type": "quantize", "config": {"scheme": "w8", "include": [...], ...}},
               {"type": "kv_cache", "config": {"bits": [8, 4, 4, 2, ...], "group_size": 64, ...}}],
     "target": {"budget": 12884901888, "context": 16384, "batch": 4}, ...}

Pruning names the heads removed (not a ratio to re-rank), quantization is deterministic round-to-nearest, so a
replay gives identical tensors. The applied recipe is recorded in the model config (``"recipe"`` transform;
the KV cache as ``"kv_cache"``), so it is in the saved ``config.json`` and ``--recipe DIR`` replays it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .. import hub
from ..kv.config import KVCacheConfig
from ..prune.heads import remove_heads
from ..quant.api import quantize
from ..quant.config import QuantConfig

FORMAT = "openautoglm-recipe"
VERSION = 1
STEP_TYPES = ("prune_heads", "quantize", "kv_cache")


def validate_recipe(recipe: dict) -> dict:
    """Check a recipe dict (format, version, step types and configs); returns it. Raises ValueError/TypeError."""
    if not isinstance(recipe, dict):
        raise TypeError(f"a recipe is a JSON object, got {type(recipe).__name__}")
    if recipe.get("format") != FORMAT:
        raise ValueError(f"not an openautoglm recipe: 'format' is {recipe.get('format')!r}, expected {FORMAT!r}")
    if recipe.get("version") != VERSION:
        raise ValueError(f"recipe version {recipe.get('version')!r} is not supported (this build reads {VERSION})")
    steps = recipe.get("steps")
    if not isinstance(steps, list):
        raise ValueError("recipe 'steps' must be a list of {'type': ..., ...} objects")
    for i, st in enumerate(steps):
        kind = st.get("type") if isinstance(st, dict) else None
        if kind not in STEP_TYPES:
            raise ValueError(f"recipe step {i}: type {kind!r}; accepted: {', '.join(STEP_TYPES)}")
        if kind == "quantize":
            QuantConfig.from_dict(st.get("config", {}))
        elif kind == "kv_cache":
            KVCacheConfig.from_dict(st.get("config", {}))
        elif not isinstance(st.get("removed"), dict):
            raise ValueError(f"recipe step {i}: prune_heads needs 'removed': {{layer: [query heads]}}")
    return recipe


def make_recipe(steps: list[dict], **extra) -> dict:
    return validate_recipe({"format": FORMAT, "version": VERSION, "steps": steps, **extra})


def save_recipe(recipe: dict, path: str | os.PathLike) -> Path:
    """Write ``recipe`` as JSON (atomically: a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(validate_recipe(recipe), indent=2))
    tmp.replace(path)
    return path


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a recipe: a ``.json`` / ``.yaml`` file, or a compressed model folder (its ``config.json`` records it)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ValueError(f"recipe {str(path)!r}: no such file (give a recipe .json/.yaml or a compressed model folder)")
    text = p.read_text("utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError("reading a YAML recipe needs PyYAML: pip install pyyaml (or give the recipe as JSON)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {p} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"recipe {p} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "format" not in data and hub.META_KEY in data:  # a model's config.json
        recorded = [t for t in hub.applied_transforms(data) if t.get("type") == "recipe"]
        if not recorded:
            raise ValueError(f"{p} records no openautoglm recipe (it was not made by compress --budget/--recipe)")
        data = recorded[-1]["recipe"]
    return validate_recipe(data)


def kv_config_of(recipe: dict) -> KVCacheConfig | None:
    """The KV cache the recipe serves with (None: full precision)."""
    for st in recipe["steps"]:
        if st["type"] == "kv_cache":
            return KVCacheConfig.from_dict(st["config"])
    return None


def apply_recipe(model: nn.Module, recipe: dict, *, progress=None) -> KVCacheConfig | None:
    """Apply ``recipe`` to ``model`` in place (pruning, then each quantization) and record it in the config.

    Returns the recipe's KV cache config (build a cache with ``kv.build(model.config)``), also recorded.
    """

    recipe = validate_recipe(recipe)
    kv = None
    for st in recipe["steps"]:
        if st["type"] == "prune_heads":
            removed = {int(k): list(v) for k, v in st["removed"].items() if v}
            if removed:
                remove_heads(model, removed, info={k: v for k, v in st.items() if k not in ("type", "removed")})
        elif st["type"] == "quantize":
            quantize(model, QuantConfig.from_dict(st["config"]), progress=progress)
        else:
            kv = KVCacheConfig.from_dict(st["config"])
            hub.record_transform(model, "kv_cache", {"config": kv.to_dict()})
    hub.record_transform(model, "recipe", {"recipe": recipe})
    model.kv_cache_config = kv
    return kv


def recorded_kv_config(model_or_config) -> KVCacheConfig | None:
    """The KV cache config a compressed model records (``kv_cache`` transform), or None."""
    found = [t for t in hub.applied_transforms(model_or_config) if t.get("type") == "kv_cache"]
    return KVCacheConfig.from_dict(found[-1]["config"]) if found else None


@hub.register_rebuilder("recipe")
def _rebuild_recipe(model: nn.Module, spec: dict) -> None:
    """The record of the whole recipe; its steps are recorded (and rebuilt) one by one."""
