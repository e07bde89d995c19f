"""openautoglm: shrink the memory of large language models while keeping their quality.

>>> from openautoglm import AutoModelForCausalLM, DynamicQuantizer
>>> model = AutoModelForCausalLM.from_pretrained("open-autoglm-base")
>>> DynamicQuantizer.quantize(model, bits=8)          # doctest: +SKIP
>>> model.save_pretrained("out/base-int8")            # doctest: +SKIP

Heavy sub-packages are imported lazily on first use of one of their names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import hub
from .errors import CheckpointError, ModelNotFoundError, OpenAutoGLMError, UnsupportedModelError
from .hub import (
    AutoModelForCausalLM,
    AutoTokenizer,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
    shipped_models,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "perplexity": "openautoglm.evaluate",
    "bleu_vs_baseline": "openautoglm.evaluate",
    "load_heldout_text": "openautoglm.evaluate",
    "model_bytes": "openautoglm.memory.estimate",
    "kv_cache_bytes": "openautoglm.memory.estimate",
}


def _register_lazy(names: dict[str, str]) -> None:
    """Capabilities add their public names here (one line per capability module)."""
    _LAZY.update(names)


_register_lazy({
    "DynamicQuantizer": "openautoglm.quant.api",
    "StaticQuantizer": "openautoglm.quant.static",
    "QuantConfig": "openautoglm.quant.config",
    "quantize": "openautoglm.quant.api",
    "quantize_pretrained": "openautoglm.quant.pretrained",
    "QuantizedKVCache": "openautoglm.kv.quantized",
    "CrossLayerKVCache": "openautoglm.kv.sharing",
    "KVCacheConfig": "openautoglm.kv.config",
    "HeadPruner": "openautoglm.prune.heads",
    "estimate_memory": "openautoglm.memory.estimate",
    "MemoryProfiler": "openautoglm.memory.profile",
    "plan_training": "openautoglm.memory.plan",
})
_register_lazy({  # KV cache: fused decode attention, calibrated cross-layer sharing
    "enable_fused_attention": "openautoglm.kv.attention", "search_sharing": "openautoglm.kv.share_search",
    "MixedKVCache": "openautoglm.kv.mixed",
})
_register_lazy({"enable_fast_generate": "openautoglm.generation.routing"})  # model.generate -> compiled static-cache decode
_register_lazy({  # budget-driven compression
    "compress_to_budget": "openautoglm.auto", "apply_recipe": "openautoglm.auto", "load_recipe": "openautoglm.auto",
})
_register_lazy({  # pruning
    "HeadPruneConfig": "openautoglm.prune", "sparsify": "openautoglm.prune", "SparsityConfig": "openautoglm.prune",
    "low_rank": "openautoglm.prune", "LowRankConfig": "openautoglm.prune", "recover": "openautoglm.prune",
    "PruneRecipe": "openautoglm.prune", "apply_pruning": "openautoglm.prune",
})


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'openautoglm' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


# ----------------------------------------------------------------------------- composition root
# The hub (loading) sits below the capabilities in the import layers and never imports them; they plug into
# it here. Each callable imports its capability on first use, so ``import openautoglm`` stays light.

def _import_transform_capabilities() -> None:
    """Import the packages whose ``register_rebuilder`` calls let recorded transforms be rebuilt on load."""
    for mod in ("openautoglm.quant", "openautoglm.prune", "openautoglm.kv", "openautoglm.auto.recipe"):
        importlib.import_module(mod)


def _quantize_on_load(model, quantization, bits, *, device, source):
    return importlib.import_module("openautoglm.quant.onload").QuantizeOnLoad.for_model(
        model, quantization, bits, device=device, source=source)


def _route_generate(model) -> None:
    """``model.generate(cache_implementation="static")`` -> the compiled decode, unless the user opted out."""
    importlib.import_module("openautoglm.generation.routing").enable_by_default(model)


hub.plugins.add_rebuilder_provider(_import_transform_capabilities)
hub.plugins.set_quantize_on_load(_quantize_on_load)
hub.plugins.on_model_ready(_route_generate)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AutoModelForCausalLM", "AutoTokenizer", "from_pretrained", "load_tokenizer", "save_pretrained",
    "shipped_models", "OpenAutoGLMError", "ModelNotFoundError", "UnsupportedModelError", "CheckpointError",
    *_LAZY,
]

if TYPE_CHECKING:  # pragma: no cover
    from .evaluate import bleu_vs_baseline, load_heldout_text, perplexity  # noqa: F401
