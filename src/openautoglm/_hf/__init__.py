"""The one place that touches transformers internals (with its per-family attention table, ``_hf_attention``).

Module names, the causal-LM registry, attention layout and the Cache keyword all move between
transformers releases (5.24 renamed the forward keyword ``past_key_values`` to ``cache``); everything
else in openautoglm calls these helpers instead of reaching into transformers itself.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from . import attention as _attn
from . import moe  # noqa: F401  (mixture-of-experts layouts: _hf.moe)
from .attention import (  # noqa: F401  (the adapter's public surface: callers use _hf.<name>)
    INDEXED_GQA_ATTENTION,
    _AttnConfigView,
    as_linear,
    attention_layout,
    attention_of,
    clip_qkv,
    cut_heads,
    head_counts,
    in_features,
    is_conv1d,
    is_linear_like,
    out_features,
    output_projection,
    output_weight,
    projection_modules,
    qk_norm_kind,
    query_weight,
    resize_heads,
    set_attention_layout,
)


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


class _ReachedLayer(Exception):
    """Raised by the pre-hook of :func:`decoder_layer_inputs` to stop the forward at the first layer."""


def decoder_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[tuple, dict]:
    """Run ``model`` on ``input_ids: (batch, seq)`` only up to its first decoder layer and return the
    ``(args, kwargs)`` that layer was called with (``args[0]``: hidden states ``(batch, seq, hidden)``; the
    kwargs carry the mask, position ids and rotary embeddings). Used to run the layers one at a time,
    without a KV cache; the layers themselves may still be on the meta device."""
    first = decoder_layers(model)[0]
    seen: dict = {}

    def stop(_mod, args, kwargs):
        seen["call"] = (args, kwargs)
        raise _ReachedLayer

    handle = first.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids, use_cache=False)
    except _ReachedLayer:
        pass
    finally:
        handle.remove()
    if "call" not in seen:
        raise TypeError(f"{type(model).__name__} did not call its first decoder layer")
    return seen["call"]


def run_decoder_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """One decoder layer on ``hidden: (batch, seq, hidden)`` with the other inputs captured by
    :func:`decoder_layer_inputs`; returns the new hidden states."""
    out = layer(hidden, *args[1:], **kwargs)
    return out[0] if isinstance(out, tuple) else out


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head (Llama-family: ``model.model.norm``)."""
    for name in ("norm", "final_layernorm", "ln_f"):
        mod = getattr(model.base_model, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise TypeError(f"cannot find the final norm of {type(model).__name__}; supported: Llama-family models")


def attention_modules(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(layer index, attention module)`` for every decoder layer (the families of :mod:`._hf_attention`:
    separate q/k/v/o projections, Phi-3's fused ``qkv_proj``, GPT-2's ``Conv1D`` ``c_attn``/``c_proj``)."""
    for i, layer in enumerate(decoder_layers(model)):
        attn = _attn.attention_of(layer)
        if attn is None:
            raise TypeError(f"layer {i} of {type(model).__name__} has no attention module named "
                            f"{' or '.join(_attn.ATTENTION_ATTRS)} (it has {[n for n, _ in layer.named_children()]})")
        try:
            _attn.family_of(attn)
        except TypeError as e:
            raise TypeError(f"layer {i} of {type(model).__name__}: {e}") from None
        yield i, attn


def separate_qkv_attention_modules(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """:func:`attention_modules`, refusing any layout but separate q/k/v/o projections (what tensor parallelism
    splits) with a ``TypeError`` naming the layer."""
    for i, attn in attention_modules(model):
        if _attn.family_of(attn) is not _attn.FAMILIES[0]:
            raise TypeError(
                f"layer {i} of {type(model).__name__} has no Llama-style self_attn (q/k/v/o_proj) but "
                f"{_attn.family_of(attn).name}; supported: Llama, Mistral, Qwen2/3 attention"
            )
        yield i, attn


def mlp_projections(model: nn.Module) -> Iterator[tuple[int, nn.Module, nn.Module, nn.Module]]:
    """Yield ``(layer index, gate_proj, up_proj, down_proj)`` of Llama-family gated MLPs."""
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            kind = type(mlp).__name__ if mlp is not None else "no mlp"
            raise TypeError(
                f"layer {i} of {type(model).__name__} has no gated MLP with gate/up/down_proj ({kind}); "
                "supported: Llama, Mistral, Qwen2/3 MLPs (not fused gate_up or mixture-of-experts)"
            )
        yield i, mlp.gate_proj, mlp.up_proj, mlp.down_proj


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
            # transformers 5.24 dropped the ``device`` argument: build on the CPU, then move
            fresh = type(module)(config=module.config).to(device)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fresh)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers still on the meta device after loading: {left[:5]}")


def own_config(model: nn.Module) -> None:
    """Give ``model`` a private deep copy of its config, re-pointing every submodule that shares it.

    ``LlamaForCausalLM(cfg)`` keeps ``cfg`` itself (as do its inner ``LlamaModel``, attention and rotary
    modules), so two models built from one config object share it. Transforms are recorded in the config;
    recording them on a shared one would mark the other models too. Sub-configs (``text_config``) are
    copied and re-pointed in the same pass.
    """
    from transformers import PretrainedConfig

    old = model.config
    memo: dict[int, object] = {}
    new = copy.deepcopy(old, memo)
    copies = {k: v for k, v in memo.items() if isinstance(v, PretrainedConfig)}
    copies[id(old)] = new
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if isinstance(cfg, _AttnConfigView):
            base = cfg._openautoglm_base
            object.__setattr__(cfg, "_openautoglm_base", copies.get(id(base), base))
        elif cfg is not None and id(cfg) in copies:
            module.config = copies[id(cfg)]


# ----------------------------------------------------------------------------- one layer's attention, replaced

OVERRIDE_ATTENTION = "openautoglm_override"


class _OverrideConfigView:
    """The attention module's config (or its per-module view) with ``_attn_implementation`` naming the override."""

    def __init__(self, config):
        object.__setattr__(self, "_openautoglm_inner", config)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_openautoglm_inner":
            raise AttributeError(name)
        return getattr(self._openautoglm_inner, name)

    def __setattr__(self, name, value):
        setattr(self._openautoglm_inner, name, value)

    @property
    def _attn_implementation(self):
        return OVERRIDE_ATTENTION


def _override_attention(module, query, key, value, attention_mask, **kwargs):
    return module._openautoglm_attn_override(module, query, key, value, attention_mask, **kwargs)


@functools.lru_cache(maxsize=None)
def _register_override() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(OVERRIDE_ATTENTION, _override_attention)


@contextlib.contextmanager
def override_attention(attn: nn.Module, fn):
    """Inside the block, ``attn`` computes its attention with ``fn(module, query, key, value, attention_mask,
    scaling=..., **kw) -> (output (batch, seq, heads, head_dim), weights or None)``; query (batch, n_q, seq, d),
    key/value (batch, n_kv, kv_seq, d) after RoPE, exactly what the model's attention function would get."""
    _register_override()
    old = attn.config
    attn.config = _OverrideConfigView(old)
    attn._openautoglm_attn_override = fn
    try:
        yield attn
    finally:
        attn.config = old
        del attn._openautoglm_attn_override


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (5.24 renamed the method and its kwargs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"{type(model).__name__} does not support activation checkpointing; use a transformers model")


# ---- KV cache API (openautoglm.kv) ------------------------------------------------------------

def cache_base_classes():
    """``(Cache, CacheLayerMixin)`` of the installed transformers (5.17 and 5.24 share this API)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    return Cache, CacheLayerMixin


def check_kv_cache_support(config) -> None:
    """Raise if the attention of ``config`` is not causal self-attention with per-head K/V (full or sliding
    window: Llama, Mistral, Qwen2/3).

    Multi-head latent attention (no per-head K/V to quantize), cross-attention and layer kinds other than
    full / sliding attention (linear attention, chunked) cannot be served by the compressed KV caches.
    """
    cfg = text_config(config)
    name = getattr(cfg, "model_type", type(cfg).__name__)
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"{name}: cross-attention (encoder-decoder) models are not supported by the compressed KV caches")
    if getattr(cfg, "kv_lora_rank", None) or getattr(cfg, "q_lora_rank", None):
        raise ValueError(f"{name}: multi-head latent attention (MLA) is not supported by the compressed KV caches")
    types = getattr(cfg, "layer_types", None) or []
    bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise ValueError(f"{name}: layer types {bad} are not supported by the compressed KV caches; "
                         "supported: full_attention, sliding_attention")


def layer_windows(config) -> list[int]:
    """Sliding-window size of every decoder layer (0: full attention), from ``layer_types`` when the config
    has them, else ``sliding_window`` for every layer (Mistral) unless ``use_sliding_window`` is False."""
    cfg = text_config(config)
    n = num_layers(cfg)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    types = getattr(cfg, "layer_types", None)
    if types:
        return [int(window or 0) if t == "sliding_attention" else 0 for t in types[:n]]
    return [int(window or 0)] * n


def register_attention_function(name: str, fn) -> None:
    """Register ``fn`` as attention implementation ``name``, with transformers' boolean (sdpa) masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def attention_function(name: str):
    """transformers' attention function for implementation ``name`` (``eager``: the Llama one)."""
    if name in (None, "eager"):
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def attention_implementation_of(config) -> str | None:
    """The attention implementation a config selects (``None`` if it names none)."""
    return getattr(config, "_attn_implementation", None)


def all_configs(model: nn.Module) -> list:
    """The model's config and its text sub-config (they may be the same object)."""
    cfgs = [model.config]
    tc = text_config(model.config)
    if tc is not model.config:
        cfgs.append(tc)
    return cfgs


def generate_with_cache(model: nn.Module, input_ids: torch.Tensor, cache, **kwargs):
    """``model.generate`` with a user cache under the keyword this transformers version expects."""
    return model.generate(input_ids, **{cache_kwarg(model): cache}, **kwargs)


def attention_implementation(model: nn.Module) -> str:
    """The attention backend in use (``sdpa``, ``eager``, ...)."""
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """Switch the attention backend (``eager`` is needed to return attention weights)."""
    model.set_attn_implementation(name)
