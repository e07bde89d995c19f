"""Attention projections of each supported family, and head surgery on them (part of the transformers adapter).

The one table of where each family keeps its attention weights; everything that slices heads, hooks the output
projection or reads a head's weights goes through the functions below.

========================================  ===========  ==========================================  ===========
family                                    attention    q, k, v                                     output
========================================  ===========  ==========================================  ===========
Llama, Mistral, Qwen2, Qwen3, Gemma        ``self_attn`` ``q_proj``, ``k_proj``, ``v_proj`` (Linear)    ``o_proj``
Phi-3                                     ``self_attn`` ``qkv_proj`` (Linear, rows ``[q | k | v]``)     ``o_proj``
GPT-2                                     ``attn``      ``c_attn`` (``Conv1D``, columns ``[q | k | v]``)  ``c_proj``
========================================  ===========  ==========================================  ===========

Head counts: the separate family computes them from the projection shapes (``view(..., -1, head_dim)``);
Phi-3 slices its fused output with ``config.num_attention_heads`` and ``self.num_key_value_heads``; GPT-2 splits
``c_attn``'s output every ``split_size`` columns and views it with ``num_heads``. :func:`set_head_counts` sets
those for a pruned layer (Phi-3's through a per-module config view, see ``_hf.set_attention_layout``).

transformers' ``Conv1D`` is a Linear with a transposed weight: ``y = x @ W + b``, ``W`` of shape ``(in, out)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# ----------------------------------------------------------------------------- Linear-like layers

def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): weight ``(in, out)``, ``nx`` inputs, ``nf`` outputs."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear_like(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass such as a quantized layer) or a transformers ``Conv1D``."""
    return type(module) is nn.Linear or is_conv1d(module)


def in_features(module: nn.Module) -> int:
    """Input features of a Linear, ``Conv1D``, quantized or factorized projection."""
    if is_conv1d(module):
        return int(module.nx)
    n = getattr(module, "in_features", None)
    return int(n) if n is not None else int(module.weight.shape[1])


def out_features(module: nn.Module) -> int:
    if is_conv1d(module):
        return int(module.nf)
    n = getattr(module, "out_features", None)
    return int(n) if n is not None else int(module.weight.shape[0])


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (a transposed view for ``Conv1D``)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` itself if it is a plain ``nn.Linear``; for a ``Conv1D`` an equivalent ``nn.Linear`` (its weight
    transposed into a contiguous copy, its bias shared); else ``None``. Used to quantize GPT-2's projections."""
    if type(module) is nn.Linear:
        return module
    if not is_conv1d(module):
        return None
    w = module.weight
    lin = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return lin


def new_like(module: nn.Module, out_f: int, in_f: int) -> nn.Module:
    """An uninitialised layer of ``module``'s kind, device and dtype with the given sizes."""
    w = module.weight
    if is_conv1d(module):
        with torch.device(w.device):
            return type(module)(out_f, in_f).to(w.dtype)
    return nn.Linear(in_f, out_f, bias=module.bias is not None, device=w.device, dtype=w.dtype)


def slice_layer(module: nn.Module, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Module:
    """A copy of a Linear/Conv1D keeping output features ``out_idx`` and input features ``in_idx``."""
    if not is_linear_like(module):
        raise TypeError(f"head pruning cuts plain nn.Linear or Conv1D projections, found {type(module).__name__}; "
                        "prune heads before quantization or low-rank factorization")
    w = weight_out_in(module).detach()
    if out_idx is not None:
        w = w[out_idx.to(w.device)]
    if in_idx is not None:
        w = w[:, in_idx.to(w.device)]
    new = new_like(module, w.shape[0], w.shape[1])
    with torch.no_grad():
        weight_out_in(new).copy_(w)
        if module.bias is not None:
            b = module.bias.detach()
            new.bias.copy_(b[out_idx.to(b.device)] if out_idx is not None else b)
    new.weight.requires_grad_(module.weight.requires_grad)
    if new.bias is not None and module.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    return new


# ----------------------------------------------------------------------------- the family table

@dataclass(frozen=True)
class Family:
    """Where one family keeps its attention projections (attribute names on the attention module)."""

    name: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None     # fused [q | k | v] output
    o: str = "o_proj"
    counts_in_config: bool = False  # head counts read from config.num_attention_heads (Phi-3)

    def projections(self) -> tuple[str, ...]:
        return tuple(n for n in (self.q, self.k, self.v, self.qkv, self.o) if n)


FAMILIES = (
    Family("separate q/k/v (Llama, Mistral, Qwen2/3, Gemma)", q="q_proj", k="k_proj", v="v_proj"),
    Family("fused qkv_proj (Phi-3)", qkv="qkv_proj", counts_in_config=True),
    Family("Conv1D c_attn (GPT-2)", qkv="c_attn", o="c_proj"),
)
ATTENTION_ATTRS = ("self_attn", "attn", "attention")


def attention_of(layer: nn.Module) -> nn.Module | None:
    for name in ATTENTION_ATTRS:
        attn = getattr(layer, name, None)
        if isinstance(attn, nn.Module):
            return attn
    return None


def family_of(attn: nn.Module) -> Family:
    """The :class:`Family` of an attention module; ``TypeError`` naming what is missing otherwise."""
    for fam in FAMILIES:
        if all(isinstance(getattr(attn, n, None), nn.Module) for n in fam.projections()):
            return fam
    have = sorted(n for n, _ in attn.named_children())
    raise TypeError(
        f"{type(attn).__name__} has none of the attention layouts openautoglm can cut heads from or read head "
        f"counts of: {'; '.join(f.name + ' = ' + '/'.join(f.projections()) for f in FAMILIES)}; it has {have}"
    )


def head_dim(attn: nn.Module) -> int:
    return int(attn.head_dim)


def qk_norm_kind(attn: nn.Module) -> str | None:
    """``"head"``: RMSNorm of q and k per head, after the heads are split (Qwen3, Qwen3-MoE); ``"full"``: over the
    whole projection, before (OLMoE); None: no q/k norm."""
    w = getattr(getattr(attn, "q_norm", None), "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    return "full" if w.numel() > int(attn.head_dim) else "head"


def clip_qkv(attn: nn.Module) -> float | None:
    """OLMoE's ``config.clip_qkv``: q, k and v clamped to +-clip before the heads are split (None: no clamp)."""
    v = getattr(getattr(attn, "config", None), "clip_qkv", None)
    return float(v) if v is not None else None


def head_counts(attn: nn.Module) -> tuple[int, int]:
    """(query heads, KV heads) the module computes with now."""
    fam, hd = family_of(attn), head_dim(attn)
    if fam.q:
        return out_features(getattr(attn, fam.q)) // hd, out_features(getattr(attn, fam.k)) // hd
    n_q = in_features(getattr(attn, fam.o)) // hd
    if fam.counts_in_config:
        n_kv = int(attn.num_key_value_heads)
    else:  # GPT-2: multi-head attention, K and V as wide as Q
        n_kv = (out_features(getattr(attn, fam.qkv)) // hd - n_q) // 2
    return n_q, n_kv


def output_projection(attn: nn.Module) -> nn.Module:
    """The layer whose input is the concatenated head outputs ``(..., n_q * head_dim)`` (``o_proj``/``c_proj``)."""
    return getattr(attn, family_of(attn).o)


def query_weight(attn: nn.Module) -> torch.Tensor:
    """``(n_q * head_dim, hidden)``: the rows that make the query heads."""
    fam = family_of(attn)
    if fam.q:
        return weight_out_in(getattr(attn, fam.q))
    n_q, _ = head_counts(attn)
    return weight_out_in(getattr(attn, fam.qkv))[: n_q * head_dim(attn)]


def output_weight(attn: nn.Module) -> torch.Tensor:
    """``(hidden, n_q * head_dim)``."""
    return weight_out_in(output_projection(attn))


def projection_modules(attn: nn.Module) -> list[nn.Module]:
    return [getattr(attn, n) for n in family_of(attn).projections()]


def _rows(heads: Sequence[int], hd: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([offset + h * hd + j for h in heads for j in range(hd)], dtype=torch.long)


def _check_separable(attn: nn.Module) -> None:
    """Heads can be cut one by one only when nothing mixes them before ``o_proj``: OLMoE's q/k RMSNorm runs over
    the whole projection width (all heads together), so removing a head would re-normalize the others."""
    hd = head_dim(attn)
    for name in ("q_norm", "k_norm"):
        w = getattr(getattr(attn, name, None), "weight", None)
        if isinstance(w, torch.Tensor) and w.numel() > hd:
            raise TypeError(f"{type(attn).__name__} normalizes {name[0]} over all heads together ({name} of width "
                            f"{w.numel()}, head_dim {hd}): removing heads would change every other head's "
                            "normalization, so head pruning is not offered for this attention (OLMoE)")


def _cut_sinks(attn: nn.Module, keep_q: Sequence[int] | None, n_q: int) -> None:
    """GPT-OSS's per-query-head attention sinks ``sinks (n_q,)`` follow the heads (cut, or resized empty)."""
    s = getattr(attn, "sinks", None)
    if not isinstance(s, nn.Parameter):
        return
    new = s.detach()[torch.as_tensor(list(keep_q), device=s.device)] if keep_q is not None else \
        torch.empty(n_q, dtype=s.dtype, device=s.device)
    attn.sinks = nn.Parameter(new.clone() if keep_q is not None else new, requires_grad=s.requires_grad)


def cut_heads(attn: nn.Module, keep_q: Sequence[int], keep_kv: Sequence[int]) -> None:
    """Keep query heads ``keep_q`` and KV heads ``keep_kv`` (indices in the current layout) of every projection."""
    _check_separable(attn)
    fam, hd = family_of(attn), head_dim(attn)
    n_q, n_kv = head_counts(attn)
    q_rows, kv_rows = _rows(keep_q, hd), _rows(keep_kv, hd)
    if fam.q:
        setattr(attn, fam.q, slice_layer(getattr(attn, fam.q), out_idx=q_rows))
        setattr(attn, fam.k, slice_layer(getattr(attn, fam.k), out_idx=kv_rows))
        setattr(attn, fam.v, slice_layer(getattr(attn, fam.v), out_idx=kv_rows))
    else:
        rows = torch.cat([q_rows, _rows(keep_kv, hd, n_q * hd), _rows(keep_kv, hd, (n_q + n_kv) * hd)])
        setattr(attn, fam.qkv, slice_layer(getattr(attn, fam.qkv), out_idx=rows))
    setattr(attn, fam.o, slice_layer(getattr(attn, fam.o), in_idx=q_rows))
    _cut_sinks(attn, keep_q, len(keep_q))
    set_head_counts(attn, len(keep_q), len(keep_kv))


def resize_heads(attn: nn.Module, n_q: int, n_kv: int) -> None:
    """Give an (empty) attention module the projection shapes of ``n_q`` query and ``n_kv`` KV heads."""
    fam, hd = family_of(attn), head_dim(attn)
    if fam.q:
        for name, n in ((fam.q, n_q), (fam.k, n_kv), (fam.v, n_kv)):
            mod = getattr(attn, name)
            setattr(attn, name, new_like(mod, n * hd, in_features(mod)))
    else:
        mod = getattr(attn, fam.qkv)
        setattr(attn, fam.qkv, new_like(mod, (n_q + 2 * n_kv) * hd, in_features(mod)))
    o = getattr(attn, fam.o)
    setattr(attn, fam.o, new_like(o, out_features(o), n_q * hd))
    _cut_sinks(attn, None, n_q)
    set_head_counts(attn, n_q, n_kv)


def set_head_counts(attn: nn.Module, n_q: int, n_kv: int) -> None:
    """The module attributes a family reads its head counts from (the projection shapes must already match)."""
    fam = family_of(attn)
    if fam.counts_in_config:
        attn.num_key_value_heads = n_kv  # num_attention_heads comes from the per-module config view
    if hasattr(attn, "split_size"):  # GPT-2: c_attn's output is split every split_size columns
        attn.split_size = n_q * head_dim(attn)
    if hasattr(attn, "num_heads"):
        attn.num_heads = n_q


def config_overrides(attn: nn.Module, n_q: int, n_kv: int) -> dict[str, int]:
    """Config attributes the module's forward reads its head counts from (Phi-3), for a per-module view."""
    if family_of(attn).counts_in_config:
        return {"num_attention_heads": n_q, "num_key_value_heads": n_kv}
    return {}


# ----------------------------------------------------------------------------- per-layer head counts (pruning)
#
# Llama-family attention takes its head counts from the projection shapes (``view(..., -1, head_dim)``) except
# for ``num_key_value_groups``, which the attention functions use to repeat K/V heads uniformly. A pruned layer
# whose KV groups keep equal numbers of query heads only needs that attribute set. A layer with uneven groups
# gets an index map (query head -> KV head) and a per-module config view that routes its attention call through
# ``_indexed_gqa_attention``, which gathers K/V by that map and then calls the model's real attention function
# (eager, sdpa, flash...). The model config, the attention masks and the cache layout stay untouched.

INDEXED_GQA_ATTENTION = "openautoglm_indexed_gqa"


class _AttnConfigView:
    """A model config seen through one attention module: every attribute is the config's own, except the
    per-module ``overrides`` (head counts a family's forward reads from its config, e.g. Phi-3) and, when
    ``indexed``, ``_attn_implementation``, which then names the indexed-GQA function (the real one is read at
    call time)."""

    def __init__(self, config, overrides: dict | None = None, indexed: bool = False):
        object.__setattr__(self, "_openautoglm_base", config)
        object.__setattr__(self, "_openautoglm_overrides", dict(overrides or {}))
        object.__setattr__(self, "_openautoglm_indexed", indexed)

    def __getattr__(self, name):
        if name.startswith("__") or name.startswith("_openautoglm_"):
            raise AttributeError(name)
        if name in self._openautoglm_overrides:
            return self._openautoglm_overrides[name]
        return getattr(self._openautoglm_base, name)

    def __setattr__(self, name, value):
        setattr(self._openautoglm_base, name, value)

    @property
    def _attn_implementation(self):
        return INDEXED_GQA_ATTENTION if self._openautoglm_indexed else self._openautoglm_base._attn_implementation


def _base_attention_function(module: nn.Module):
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = module.config._openautoglm_base._attn_implementation
    if impl in (None, "eager"):
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _indexed_gqa_attention(module, query, key, value, attention_mask, **kwargs):
    """query: (batch, n_q, seq, head_dim); key/value: (batch, n_kv, kv_seq, head_dim) -> gathered to n_q heads."""
    idx = module._openautoglm_kv_index
    key = key.index_select(1, idx)
    value = value.index_select(1, idx)
    return _base_attention_function(module)(module, query, key, value, attention_mask, **kwargs)


@functools.lru_cache(maxsize=None)
def _register_indexed_gqa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(INDEXED_GQA_ATTENTION, _indexed_gqa_attention)


def attention_layout(attn: nn.Module) -> list[int]:
    """KV head read by each query head of an attention module, e.g. ``[0, 0, 1, 1]``."""
    idx = getattr(attn, "_openautoglm_kv_index", None)
    if idx is not None:
        return [int(i) for i in idx.tolist()]
    n_q, n_kv = head_counts(attn)
    return [h // (n_q // n_kv) for h in range(n_q)]


def set_attention_layout(attn: nn.Module, kv_index: list[int]) -> None:
    """Make ``attn`` run with ``len(kv_index)`` query heads, query head ``i`` reading KV head ``kv_index[i]``.

    The projections must already have the matching shapes. ``kv_index`` must be non-decreasing and use every
    KV head ``0..n_kv-1``. Works in forward and in ``generate`` with any cache (the cache holds the ``n_kv``
    un-repeated heads).
    """
    n_q = len(kv_index)
    n_kv = max(kv_index) + 1 if kv_index else 0
    if n_q == 0 or sorted(set(kv_index)) != list(range(n_kv)) or list(kv_index) != sorted(kv_index):
        raise ValueError(f"kv_index {kv_index} must be non-empty, non-decreasing and use KV heads 0..n-1")
    counts = [kv_index.count(g) for g in range(n_kv)]
    base_cfg = attn.config._openautoglm_base if isinstance(attn.config, _AttnConfigView) else attn.config
    if "_openautoglm_kv_index" in attn._buffers:
        del attn._buffers["_openautoglm_kv_index"]
    set_head_counts(attn, n_q, n_kv)
    overrides = config_overrides(attn, n_q, n_kv)
    uniform = len(set(counts)) == 1  # uniform groups: the stock attention repeats K/V correctly
    attn.num_key_value_groups = counts[0] if uniform else 1
    if uniform and not overrides:
        attn.config = base_cfg
        return
    if not uniform:
        _register_indexed_gqa()
    attn.config = _AttnConfigView(base_cfg, overrides, indexed=not uniform)
    if not uniform:
        device = projection_modules(attn)[0].weight.device
        idx = torch.tensor(kv_index, dtype=torch.long, device="cpu" if device.type == "meta" else device)
        attn.register_buffer("_openautoglm_kv_index", idx, persistent=False)
