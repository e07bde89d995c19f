"""The dimensions the memory formulas need, read from a config (meta-device model, no weights read).

``model_shape(model_or_config_or_path)`` accepts a loaded model, a transformers config, a config dict,
a shipped model name or a folder holding ``config.json``. It builds the model on the meta device (applying
recorded openautoglm transforms: quantized layers, pruned heads, low-rank projections), so parameter and
weight byte counts are exact, and reads per-layer attention/MLP widths from the modules themselves
(pruned layers differ from the config).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import _hf, hub
from .._util.modules import model_bytes
from .formulas import Arch, LayerShape, MoEShape
from .moe import experts_has_bias, experts_sizes


@dataclass
class ModelShape:
    """Everything the estimator reads from a model. Byte counts are exact (meta-device model)."""

    name: str
    model_type: str
    vocab: int
    hidden: int
    layers: list[LayerShape]
    arch: Arch                      # norm kind, fused projections, q/k norms, MLP kind, dropout
    tied: bool                      # lm_head shares the embedding matrix
    n_params: int                   # parameters, tied tensors once
    param_bytes: int                # parameters + persistent buffers as stored (quantized included)
    linear_params: int              # parameters of float nn.Linear weights (cast by autocast), tied once
    largest_matrix: int             # elements of the largest 2-D parameter
    dtype: torch.dtype              # dtype of the floating parameters
    layer_params: list[int] = field(default_factory=list)        # float parameters of each decoder layer
    layer_linear_params: list[int] = field(default_factory=list) # Linear weights of each decoder layer
    embed_params: int = 0           # input embedding (also the lm_head when tied)
    head_params: int = 0            # lm_head weight when not tied (0 when tied)
    adafactor_elems: int = 0        # factored second-moment elements: rows + cols of 2-D params, numel of 1-D
    n_tensors: int = 0              # parameter tensors (per-tensor optimizer scalars)
    float_params: int = 0           # floating-point parameters (tied once): these follow the requested dtype
    float_param_bytes: int = 0      # their bytes as built/stored
    quantized_modules: int = 0      # modules of openautoglm.quant (rebuilt from the recorded transform)
    quantized_linears: list[tuple[str, int, int, int]] = field(default_factory=list)  # (scheme, in, out, experts)
    layer_expert_params: list[int] = field(default_factory=list)  # float fused-experts parameters of each layer
    transforms: list[dict] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _meta_model_from_config(config) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    transforms = hub.applied_transforms(config)
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "n_embd", "n_layer", "n_head"):
        v = getattr(_hf.text_config(config), k, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"config {k}={v!r} must be a positive integer")
    with init_empty_weights(include_buffers=True):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except (ZeroDivisionError, AssertionError, RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"cannot build a {config.model_type} model from this config: {e}") from None
        hub.apply_rebuilders(model, transforms, skip_unknown=True)  # unknown ones: priced analytically
    return model


def _to_model(obj) -> tuple[nn.Module, str]:
    """Return a (possibly meta-device) model for a model, config, dict, name or path."""
    if isinstance(obj, nn.Module):
        return obj, getattr(obj, "name_or_path", type(obj).__name__)
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(obj, PretrainedConfig):
        return _meta_model_from_config(obj), getattr(obj, "name_or_path", "") or obj.model_type
    if isinstance(obj, dict):
        cfg = dict(obj)
        if "model_type" not in cfg:
            raise ValueError("config dict has no 'model_type'; accepted: llama, mistral, qwen2, qwen3, gemma, phi3, gpt2, ...")
        try:
            config = AutoConfig.for_model(**cfg)
        except (ValueError, KeyError) as e:
            raise ValueError(f"cannot build a config from model_type={cfg['model_type']!r}: {e}") from None
        return _meta_model_from_config(config), cfg["model_type"]
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.is_file() and p.name.endswith(".json"):
            try:
                return _to_model(json.loads(p.read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON: {e}") from None
        return hub.empty_model(obj), str(obj)
    raise TypeError(f"expected a model, a config, a config dict or a path, got {type(obj).__name__}")


def _main_dtype(params: list) -> torch.dtype:
    """The dtype holding the most elements of the trainable float parameters."""
    count: dict[torch.dtype, int] = {}
    for p in params:
        count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else torch.float32


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _hf.is_conv1d(mod)


def _out_features(mod: nn.Module | None) -> int | None:
    if mod is None:
        return None
    if getattr(mod, "out_features", None):
        return int(mod.out_features)
    if _hf.is_conv1d(mod):  # GPT-2: weight is (in, out), ``nf`` outputs
        return int(mod.nf)
    w = getattr(mod, "weight", None)
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def _arch(model: nn.Module, config, gated: bool) -> Arch:
    layer = _hf.decoder_layers(model)[0]
    norms = [type(m).__name__ for m in layer.modules() if "norm" in type(m).__name__.lower()]
    kind = "layer" if any(n == "LayerNorm" for n in norms) else ("rms_fp32" if any("Gemma" in n for n in norms) else "rms")
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
    names = {n for n, _ in attn.named_children()} if attn is not None else set()
    tc = _hf.text_config(config)
    act = str(getattr(tc, "activation_function", None) or getattr(tc, "hidden_act", "silu"))
    drop = any(float(getattr(tc, k, 0) or 0) > 0 for k in ("embd_pdrop", "resid_pdrop", "hidden_dropout", "resid_dropout"))
    eager = getattr(config, "_attn_implementation", None) == "eager"
    return Arch(norm=kind, rotary=getattr(tc, "model_type", "") not in ("gpt2", "gpt_neo", "gptj", "opt"),
                fused_qkv=bool(names & {"qkv_proj", "c_attn", "query_key_value", "Wqkv"}),
                fused_gate_up=isinstance(getattr(getattr(layer, "mlp", None), "gate_up_proj", None), nn.Module),
                qk_norm="q_norm" in names, gated_mlp=gated, act_extra=3 if (not gated and act == "gelu_new") else 0,
                dropout=drop, eager_scores=3 if eager else 0)


def _moe_shape(block: nn.Module, config) -> MoEShape:
    e, _, inter, up, _ = experts_sizes(block.experts)
    fam = _hf.moe.family_of(_hf.text_config(config))
    shared = _hf.moe.shared_of(block)
    gate = getattr(shared, "gate_proj", None) if shared is not None else None
    return MoEShape(experts=e, top_k=_hf.moe.top_k(block, _hf.text_config(config)), up=up, intermediate=inter,
                    shared=int(_hf.out_features(gate)) if gate is not None else 0,
                    weights_fp32=bool(fam and fam.router_weights_fp32),
                    bias=experts_has_bias(block.experts),
                    gate_tmp=fam.gate_temporaries if fam else 2,
                    quantized="" if _hf.moe.is_experts(block.experts) else str(getattr(block.experts, "scheme", "")))


def _layer_shapes(model: nn.Module, config) -> tuple[list[LayerShape], bool]:
    hd = _hf.head_dim(config)
    tc = _hf.text_config(config)
    inter_cfg = getattr(tc, "intermediate_size", None)
    hidden = tc.hidden_size if hasattr(tc, "hidden_size") else config.n_embd
    try:
        windows = _hf.layer_windows(config)
    except (TypeError, AttributeError):
        windows = []
    mla = _hf.moe.mla_cache_dims(tc)
    layers, gated = [], True
    for i, layer in enumerate(_hf.decoder_layers(model)):
        attn = _hf.attention_of(layer)
        try:  # per layer, from the modules: pruned layers differ from the config
            counts = _hf.head_counts(attn) if attn is not None else None
        except (TypeError, AttributeError):
            counts = None
        extra = dict(window=windows[i] if i < len(windows) else 0, cache=(1, *mla) if mla else None)
        block = _hf.moe.moe_block(layer)
        if block is not None:  # routed experts (and maybe a shared expert) instead of a dense MLP
            heads, kv = counts or (_hf.num_heads(config), _hf.num_kv_heads(config))
            layers.append(LayerShape(heads, kv, hd, 0, moe=_moe_shape(block, config), **extra))
            continue
        mlp = getattr(layer, "mlp", None)
        gate = _out_features(getattr(mlp, "gate_proj", None))
        gate_up = _out_features(getattr(mlp, "gate_up_proj", None))   # Phi-3 fuses gate and up
        fc = _out_features(getattr(mlp, "c_fc", None) or getattr(mlp, "fc1", None))
        if gate or gate_up:
            inter = gate or gate_up // 2
        else:
            gated = False
            inter = fc or inter_cfg or 4 * hidden
        heads, kv = counts or (_hf.num_heads(config), _hf.num_kv_heads(config))
        layers.append(LayerShape(heads, kv, hd, int(inter), **extra))
    return layers, gated


def model_shape(model_or_config_or_path) -> ModelShape:
    """Read a :class:`ModelShape` (see module docstring for the accepted inputs)."""
    model, name = _to_model(model_or_config_or_path)
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; pass a transformers causal LM")
    tc = _hf.text_config(config)
    for need in (("vocab_size",), ("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"),
                 ("num_attention_heads", "n_head")):
        if not any(getattr(tc, n, None) for n in need):
            raise ValueError(f"config of {name} is missing {' / '.join(need)}; the estimator needs it")
    layers, gated = _layer_shapes(model, config)
    hidden = int(getattr(tc, "hidden_size", None) or tc.n_embd)
    seen: set[int] = set()
    lin_seen: set[int] = set()
    n_params = linear = largest = 0
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            # autocast casts F.linear weights (a tied lm_head too) to the low-precision dtype
            is_lin = _is_linear(mod)
            if pname == "weight" and is_lin and p.is_floating_point() and id(p) not in lin_seen:
                lin_seen.add(id(p))
                linear += p.numel()
            if id(p) in seen:
                continue
            seen.add(id(p))
            n_params += p.numel()
            largest = max(largest, p.numel() if p.ndim >= 2 else 0)  # fused experts: (E, out, in)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_w = getattr(out, "weight", None)  # None for a quantized lm_head (codes, not a float weight)
    tied = emb is not None and out_w is not None and out_w is emb.weight
    dec = _hf.decoder_layers(model)
    layer_params = [sum(p.numel() for p in lay.parameters() if p.is_floating_point()) for lay in dec]
    layer_linear = [sum(m.weight.numel() for m in lay.modules() if _is_linear(m) and m.weight.is_floating_point())
                    for lay in dec]
    layer_experts = [sum(p.numel() for m in lay.modules() if _hf.moe.is_experts(m) for p in m.parameters()
                         if p.is_floating_point()) for lay in dec]
    params = list(dict.fromkeys(model.parameters()))
    # Adafactor factors the last two dims (leading dims, such as fused experts', are batch dims)
    ada = sum(p[..., 0, 0].numel() * (p.shape[-2] + p.shape[-1]) if p.ndim >= 2 else p.numel() for p in params)
    fl = [p for p in params if p.is_floating_point() and p.requires_grad]
    nq = sum(1 for m in model.modules() if type(m).__module__.startswith("openautoglm.quant"))
    qlin, stacks = [], set()  # (scheme, in, out, experts): a stack of quantized experts is one entry per projection
    for m in model.modules():
        if not type(m).__module__.startswith("openautoglm.quant") or not getattr(m, "scheme", ""):
            continue
        if hasattr(m, "num_experts"):
            for st in (m.gate_up, m.down):
                stacks.add(id(st))
                qlin.append((m.scheme, int(st.in_features), int(st.out_features), int(m.num_experts)))
        elif id(m) not in stacks:
            qlin.append((m.scheme, int(m.in_features), int(m.out_features), 1))

    return ModelShape(
        name=str(name), model_type=str(getattr(config, "model_type", "?")), vocab=int(tc.vocab_size), hidden=hidden,
        layers=layers, arch=_arch(model, config, gated), tied=tied, n_params=n_params, param_bytes=model_bytes(model),
        linear_params=linear, largest_matrix=largest, dtype=_main_dtype(fl),
        transforms=hub.applied_transforms(config), layer_params=layer_params, layer_linear_params=layer_linear,
        embed_params=emb.weight.numel() if emb is not None else 0,
        head_params=0 if tied or out_w is None else out_w.numel(), adafactor_elems=ada, n_tensors=len(params),
        float_params=sum(p.numel() for p in fl), float_param_bytes=sum(p.numel() * p.element_size() for p in fl),
        quantized_modules=nq, quantized_linears=qlin, layer_expert_params=layer_experts,
    )
