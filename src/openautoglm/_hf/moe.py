"""Mixture-of-experts layouts of transformers 5: where each family keeps its experts, router and shared experts,
and how its checkpoints name them.

transformers 5 keeps a layer's experts as fused 3-D parameters of one module (``mlp.experts``), decorated with
``use_experts_implementation(is_concatenated=..., is_transposed=..., has_bias=..., has_gate=...)``, which sets those
flags as attributes of every instance (5.17 and 5.25 alike) and dispatches ``forward(hidden_states (T, h),
top_k_index (T, k), top_k_weights (T, k)) -> (T, h)`` to ``config._experts_implementation`` ("eager", "batched_mm",
"grouped_mm"; the default is "grouped_mm" in 5.17 and 5.25):

============= ===================== ================== ========================= ================================
family        experts class         router / block     weights (E experts)       notes
============= ===================== ================== ========================= ================================
mixtral       MixtralExperts        ``gate`` (softmax, ``gate_up_proj (E, 2I, h)``  checkpoints: ``block_sparse_moe.
                                    top-k, renormed)   ``down_proj (E, h, I)``    experts.N.w1/w3/w2.weight``
qwen3_moe     Qwen3MoeExperts       ``gate``           same                      ``mlp.experts.N.gate/up/down_proj``
olmoe         OlmoeExperts          ``gate``           same                      q/k RMSNorm over the full width
qwen2_moe     Qwen2MoeExperts       ``gate``           same                      ``shared_expert`` MLP scaled by
                                                                                 sigmoid(``shared_expert_gate``)
deepseek_v3   DeepseekV3Experts     ``gate`` (sigmoid, same                      ``shared_experts`` MLP; the first
                                    grouped top-k,                               ``first_k_dense_replace`` layers
                                    correction bias)                             dense; MLA attention
gpt_oss       GptOssExperts         ``router`` (bias;  ``gate_up_proj (E, h, 2I)`` transposed (in, out), gate/up
                                    block returns      + ``gate_up_proj_bias``   interleaved (g0 u0 g1 u1 ...),
                                    (h, scores))       ``down_proj (E, I, h)``   clamped SwiGLU ``_apply_gate``;
                                                       + ``down_proj_bias``      attention sinks, sliding layers
============= ===================== ================== ========================= ================================

(``is_concatenated`` False = interleaved gate/up rows; ``is_transposed`` True = weights stored ``(in, out)``; the
memory estimator reads ``router_weights_fp32`` and ``gate_temporaries`` to price the routed activations.) The
checkpoint layouts come from transformers' own conversion mapping (``conversion_mapping.py``: ``WeightRenaming`` and
``WeightConverter`` with ``MergeModulelist(dim=0)`` + ``Concatenate(dim=1)``), read here by :func:`key_plan` so the
lazy loader places each per-expert tensor of a checkpoint where transformers would (:class:`Piece`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertLayout:
    """How one experts module stores its weights (the ``use_experts_implementation`` flags)."""

    is_concatenated: bool = True   # gate rows then up rows (False: interleaved g0 u0 g1 u1 ...)
    is_transposed: bool = False    # weights stored (E, in, out) instead of (E, out, in)
    has_bias: bool = False         # gate_up_proj_bias (E, 2I) / down_proj_bias (E, h)
    has_gate: bool = True          # gate_up_proj (else up_proj only: a plain activation)


@dataclass(frozen=True)
class Family:
    """One MoE family: its experts class, the attribute of the router (and of the shared-expert MLP) on the block."""

    name: str
    experts_class: str
    router: str = "gate"
    shared: str | None = None
    layout: ExpertLayout = ExpertLayout()
    notes: str = ""
    router_weights_fp32: bool = False  # the routing weights stay float32 (else cast to the hidden dtype)
    gate_temporaries: int = 2          # (tokens x I) tensors of the gated activation alive at once (SwiGLU: 2)


FAMILIES = {f.name: f for f in (
    Family("mixtral", "MixtralExperts", router_weights_fp32=True, notes="checkpoints store block_sparse_moe.experts.N.w1 (gate) / w3 (up) / w2 "
                                              "(down); transformers renames .block_sparse_moe. to .mlp. and stacks them"),
    Family("qwen3_moe", "Qwen3MoeExperts", notes="mlp_only_layers / decoder_sparse_step may leave layers dense"),
    Family("olmoe", "OlmoeExperts", notes="q_norm / k_norm over the whole projection width (not per head)"),
    Family("qwen2_moe", "Qwen2MoeExperts", shared="shared_expert",
           notes="shared_expert MLP times sigmoid(shared_expert_gate(x)), a Linear(h, 1)"),
    Family("deepseek_v3", "DeepseekV3Experts", shared="shared_experts", router_weights_fp32=True,
           notes="first_k_dense_replace dense layers; sigmoid router with group-limited top-k and "
                 "e_score_correction_bias; multi-head latent attention"),
    Family("gpt_oss", "GptOssExperts", router="router",
           layout=ExpertLayout(is_concatenated=False, is_transposed=True, has_bias=True), gate_temporaries=5,
           notes="the MoE block returns (hidden, router scores); attention sinks; sliding-window layers"),
)}


# ----------------------------------------------------------------------------- experts modules

def is_experts(module: nn.Module) -> bool:
    """A transformers fused-experts module: 3-D ``down_proj`` and ``gate_up_proj`` (or ``up_proj``) parameters."""
    down = module._parameters.get("down_proj") if hasattr(module, "_parameters") else None
    up = module._parameters.get("gate_up_proj", module._parameters.get("up_proj")) if down is not None else None
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3


def layout_of(module: nn.Module) -> ExpertLayout:
    """The layout flags an experts module carries (set on every instance by ``use_experts_implementation``)."""
    d = ExpertLayout()
    return ExpertLayout(**{k: bool(getattr(module, k, getattr(d, k))) for k in
                           ("is_concatenated", "is_transposed", "has_bias", "has_gate")})


def experts_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused-experts module of ``model`` (float ones: openautoglm's quantized experts
    are not transformers modules)."""
    for name, mod in model.named_modules():
        if is_experts(mod):
            yield name, mod


def up_name(module: nn.Module) -> str:
    return "gate_up_proj" if "gate_up_proj" in module._parameters else "up_proj"


def weight_out_in(module: nn.Module, which: str) -> torch.Tensor:
    """Weights of projection ``which`` (``"up"``: gate_up / up, ``"down"``) as ``(E, out, in)`` (a view)."""
    w = module._parameters[up_name(module) if which == "up" else "down_proj"]
    return w.transpose(-1, -2) if layout_of(module).is_transposed else w


def bias(module: nn.Module, which: str) -> torch.Tensor | None:
    """``(E, out)`` bias of projection ``which``, or None."""
    if not layout_of(module).has_bias:
        return None
    return module._parameters.get((up_name(module) if which == "up" else "down_proj") + "_bias")


def sizes(module: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of an experts module."""
    e, n, k = weight_out_in(module, "down").shape
    return int(e), int(n), int(k)


def activation_attrs(module: nn.Module) -> dict:
    """What the module's ``_apply_gate`` (or its plain activation) reads: ``act_fn`` and scalar settings
    (GPT-OSS's ``alpha`` / ``limit``), copied onto a replacement module so the same function can run on it."""
    out = {}
    for k, v in vars(module).items():
        if k.startswith("_") or k in ("training", "config"):
            continue
        if isinstance(v, (int, float, bool)) and k not in ("num_experts", "hidden_dim", "intermediate_dim",
                                                           "hidden_size", "intermediate_size"):
            out[k] = v
    act = getattr(module, "act_fn", None)
    if act is not None:
        out["act_fn"] = act
    return out


def gate_function(module: nn.Module):
    """The unbound ``_apply_gate(self, gate_up (S, 2I)) -> (S, I)`` of the module's class (``None`` without a gate:
    the plain ``act_fn`` applies)."""
    return getattr(type(module), "_apply_gate", None) if layout_of(module).has_gate else None


# ----------------------------------------------------------------------------- MoE blocks

def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", None))


def moe_block(layer: nn.Module) -> nn.Module | None:
    """The MoE block of a decoder layer (the module holding ``experts``), or None for a dense layer."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and isinstance(getattr(mlp, "experts", None), nn.Module):
        return mlp
    return None


def router_of(block: nn.Module) -> nn.Module | None:
    for name in ("gate", "router"):
        r = getattr(block, name, None)
        if isinstance(r, nn.Module) and isinstance(getattr(r, "weight", None), torch.Tensor):
            return r
    return None


def shared_of(block: nn.Module) -> nn.Module | None:
    for name in ("shared_expert", "shared_experts"):
        m = getattr(block, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def top_k(block: nn.Module, config=None) -> int:
    r = router_of(block)
    k = getattr(r, "top_k", None) or getattr(block, "top_k", None)
    if k is None and config is not None:
        k = getattr(config, "num_experts_per_tok", None)
    if not k:
        raise TypeError(f"cannot tell how many experts {type(block).__name__} routes each token to")
    return int(k)


def is_moe_config(config) -> bool:
    """A config whose layers route tokens to experts (any of the count keys transformers uses)."""
    return any((getattr(config, k, 0) or 0) > 1 for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def returns_router_scores(block: nn.Module) -> bool:
    """GPT-OSS's block returns ``(hidden, router_scores)`` instead of the hidden states alone."""
    return type(block).__name__ == "GptOssMLP"


# ----------------------------------------------------------------------------- checkpoint key conversion

@dataclass(frozen=True)
class Piece:
    """Where a checkpoint tensor goes: ``target`` (a model tensor name), at ``expert`` of its leading dim (None:
    the whole tensor), rows ``[offset, offset + rows)`` of that expert's slice (None: all of them)."""

    target: str
    expert: int | None = None
    offset: int = 0
    rows: int | None = None


def conversions(model: nn.Module) -> list:
    """transformers' own checkpoint conversions of ``model`` (renamings and converters; no legacy renames), or []."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # pragma: no cover - transformers before the conversion mapping existed
        return []
    if not hasattr(model, "config"):
        return []
    try:
        return list(get_model_conversion_mapping(model, add_legacy=False) or [])
    except (TypeError, ValueError, AttributeError):
        return []


def _ops_supported(conv) -> str | None:
    names = [type(op).__name__ for op in getattr(conv, "operations", [])]
    if names in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]):
        dims = [getattr(op, "dim", None) for op in conv.operations]
        if dims[0] == 0 and (len(dims) == 1 or dims[1] == 1):
            return None
    return f"{type(conv).__name__} with operations {names}"


def key_plan(model: nn.Module, keys: Iterable[str], shapes) -> dict[str, Piece]:
    """For checkpoint keys that transformers would rename or merge when loading ``model``: where each goes.

    ``shapes(key) -> tuple`` gives a checkpoint tensor's shape. Keys the model holds as they are, or that no
    conversion matches, are left out. Only the conversions MoE checkpoints use are interpreted (renamings, and
    per-expert tensors stacked along a new expert dim then concatenated along dim 1); another kind of converter
    matching a key raises ``NotImplementedError`` naming it.
    """
    convs = conversions(model)
    if not convs:
        return {}
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [c for c in convs if isinstance(c, WeightRenaming)]
    converters = [c for c in convs if isinstance(c, WeightConverter)]
    keys = list(keys)
    plan: dict[str, Piece] = {}
    matched: dict[str, tuple] = {}  # key -> (target, converter, source pattern, expert index)
    for key in keys:
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            if target != key:
                plan[key] = Piece(target)
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        why = _ops_supported(conv)
        if why is not None:
            raise NotImplementedError(f"checkpoint tensor {key} needs transformers' {why}, which openautoglm's lazy "
                                      "loader does not implement; load the model with transformers")
        rx = re.escape(pattern).replace(r"\*", r"(\d+)")
        renamed = key
        for r in renamings:
            renamed, _ = r.rename_source_key(renamed)
        m = re.search(rx, renamed)
        if m is None or not m.groups():
            raise NotImplementedError(f"cannot read the expert index of checkpoint tensor {key} from pattern {pattern}")
        matched[key] = (target, conv, pattern, int(m.group(1)))
    for key, (target, conv, pattern, e) in matched.items():
        j = conv.source_patterns.index(pattern)
        rows = shapes(key)[0]
        offset = 0
        if j:  # concatenated after the earlier source patterns of the same expert
            for other, (t2, c2, p2, e2) in matched.items():
                if t2 == target and e2 == e and c2.source_patterns.index(p2) < j:
                    offset += shapes(other)[0]
        plan[key] = Piece(target, e, offset, rows)
    return plan


def assembled(plan: dict[str, Piece], shapes) -> dict[str, tuple[tuple[int, ...], list[str]]]:
    """``{target: (shape it assembles to, problems)}`` for the targets the per-expert pieces of ``plan`` fill:
    ``(experts, rows per expert, *rest)``; ``problems`` names missing experts or rows that do not tile."""
    rows: dict[str, dict[int, list[tuple[int, int]]]] = {}
    rest: dict[str, tuple[int, ...]] = {}
    for key, p in plan.items():
        if p.expert is None:
            continue
        rows.setdefault(p.target, {}).setdefault(p.expert, []).append((p.offset, p.rows))
        rest[p.target] = tuple(shapes(key)[1:])
    out = {}
    for target, per in rows.items():
        n = max(per) + 1
        problems = [f"expert {e} has no tensors" for e in range(n) if e not in per]
        totals = set()
        for e, spans in per.items():
            spans.sort()
            end = 0
            for off, r in spans:
                if off != end:
                    problems.append(f"expert {e} rows {end}..{off} are missing")
                end = off + r
            totals.add(end)
        if len(totals) > 1:
            problems.append(f"experts hold different numbers of rows {sorted(totals)}")
        out[target] = ((n, max(totals), *rest[target]), problems)
    return out


def mla_cache_dims(config) -> tuple[int, int] | None:
    """Multi-head latent attention (DeepSeek-V2/V3): transformers 5.17 and 5.25 cache the compressed latent as one
    "head", ``kv_lora_rank`` wide in the key slot and ``qk_rope_head_dim`` in the value slot; (key, value) widths,
    or None for per-head K/V."""
    r = getattr(config, "kv_lora_rank", None)
    return (int(r), int(getattr(config, "qk_rope_head_dim", 0) or 0)) if r else None


# ----------------------------------------------------------------------------- keeping a subset of the experts

def _keep_rows(owner: nn.Module, attr: str, idx: torch.Tensor, buffer: bool = False) -> None:
    store = owner._buffers if buffer else owner._parameters
    t = store.get(attr)
    if t is None:
        return
    new = t.detach().index_select(0, idx.to(t.device)) if not t.is_meta else torch.empty(
        (len(idx), *t.shape[1:]), dtype=t.dtype, device="meta")
    store[attr] = new if buffer else nn.Parameter(new, requires_grad=t.requires_grad)


def keep_experts(module: nn.Module, keep: list[int]) -> None:
    """Keep experts ``keep`` (in that order) of a transformers experts module: every per-expert tensor (weights and
    biases, leading dim E) sliced, ``num_experts`` updated. Works on the meta device (rebuilding a checkpoint)."""
    idx = torch.tensor(keep, dtype=torch.long)
    for name in list(module._parameters):
        _keep_rows(module, name, idx)
    module.num_experts = len(keep)


def keep_router_rows(router: nn.Module, keep: list[int], config=None) -> None:
    """The router scores only experts ``keep``: its weight rows (and GPT-OSS's bias, DeepSeek's score-correction
    bias) sliced and ``num_experts`` updated. A softmax router then renormalizes over the experts left; DeepSeek-V3's
    group-limited routing is refused unless it has one group (the groups would no longer hold equal experts)."""
    groups = getattr(router, "num_group", 1) or 1
    if groups > 1:
        raise ValueError(f"{type(router).__name__} routes within {groups} expert groups; pruning experts is offered for "
                         "one group (n_group=1) only")
    k = getattr(router, "top_k", None)
    if k is not None and len(keep) < int(k):
        raise ValueError(f"cannot keep {len(keep)} experts: the router picks top-{k}")
    idx = torch.tensor(keep, dtype=torch.long)
    _keep_rows(router, "weight", idx)
    _keep_rows(router, "bias", idx)
    _keep_rows(router, "e_score_correction_bias", idx, buffer=True)
    if hasattr(router, "num_experts"):
        router.num_experts = len(keep)


def router_indices(output) -> torch.Tensor | None:
    """The ``top_k_index (T, k)`` of a router's output: transformers 5 routers return ``(logits, weights, indices)``."""
    if isinstance(output, tuple) and len(output) == 3 and isinstance(output[2], torch.Tensor):
        return output[2]
    return None


def router_weights(output) -> torch.Tensor | None:
    if isinstance(output, tuple) and len(output) == 3 and isinstance(output[1], torch.Tensor):
        return output[1]
    return None
