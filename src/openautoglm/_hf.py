"""The one place that touches transformers internals.

Module names, the causal-LM registry, attention layout and the Cache keyword all move between
transformers releases (5.24 renamed the forward keyword ``past_key_values`` to ``cache``); everything
else in openautoglm calls these helpers instead of reaching into transformers itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn


def causal_lm_model_types() -> set[str]:
    """``model_type`` values that transformers can build as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def is_causal_lm_config(config) -> bool:
    """True when ``config`` describes a decoder-only causal LM (by architectures, else model_type)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return getattr(config, "model_type", None) in causal_lm_model_types()


def text_config(config):
    """The text part of a (possibly multimodal) config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def num_heads(config) -> int:
    cfg = text_config(config)
    return int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head"))


def num_kv_heads(config) -> int:
    cfg = text_config(config)
    kv = getattr(cfg, "num_key_value_heads", None)
    return int(kv) if kv else num_heads(cfg)


def head_dim(config) -> int:
    cfg = text_config(config)
    hd = getattr(cfg, "head_dim", None)
    if hd:
        return int(hd)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    return int(hidden) // num_heads(cfg)


def num_layers(config) -> int:
    cfg = text_config(config)
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama/Mistral/Qwen: ``model.model.layers``)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}; supported: Llama-family models")


def attention_modules(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(layer index, attention module)`` for Llama-family attention (q/k/v/o projections)."""
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise TypeError(
                f"layer {i} of {type(model).__name__} has no Llama-style self_attn (q/k/v/o_proj); "
                "supported: Llama, Mistral, Qwen2/3 attention"
            )
        yield i, attn


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """Name of the forward keyword that takes a KV cache (``cache`` from transformers 5.24 on)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def forward_with_cache(model: nn.Module, input_ids: torch.Tensor, cache, **kwargs):
    """Call ``model`` with ``cache`` under whichever keyword this transformers version uses."""
    return model(input_ids=input_ids, use_cache=True, **{cache_kwarg(model): cache}, **kwargs)


def output_cache(outputs):
    """The cache returned by a forward pass (``past_key_values`` or ``cache`` attribute)."""
    for name in ("past_key_values", "cache"):
        c = getattr(outputs, name, None)
        if c is not None:
            return c
    return None


def rebuild_rotary_buffers(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Recreate non-persistent buffers (rotary ``inv_freq``) left on the meta device after an empty init."""
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)) and "rotary" in type(module).__name__.lower():
            fresh = type(module)(config=module.config, device=device)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fresh)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers still on the meta device after loading: {left[:5]}")
