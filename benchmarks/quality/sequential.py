"""Layer-by-layer fake quantization of a Llama-family model with the calib methods (benchmark-side surgery).

The sequential pipeline of llm-compressor / the GPTQ reference: the calibration windows are run up to decoder
layer 0 once; then for each layer in turn the inputs of its Linears are captured from *the already quantized
earlier layers' outputs*, the layer's weights are replaced by their dequantized codes (fake quantization: the
float Linear keeps the values the integer codes stand for), and the layer is run again to give the next layer's
inputs. One layer's activations in memory. Linears: q/k/v/o, gate/up/down of every decoder layer (not lm_head).
"""

from __future__ import annotations

import torch
from torch import nn

from openautoglm.quant.calib import (HessianAccumulator, apply_scales, awq_quantize, awq_search_scales, fold_into_norm,
                                     gptq_quantize, hqq_quantize, rtn, smooth_search)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class _Stop(Exception):
    pass


@torch.no_grad()
def layer0_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[tuple[tuple, dict]]:
    """(args, kwargs) that decoder layer 0 receives for each batch of calibration windows."""
    cache = []

    def hook(_m, args, kwargs):
        cache.append((args, kwargs))
        raise _Stop

    h = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in windows.split(batch_size):
            try:
                model(input_ids=x, use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return cache


def _run(layer, states, kw):
    out = []
    for h, k in zip(states, kw):
        y = layer(h, **k)
        out.append(y[0] if isinstance(y, tuple) else y)
    return out


@torch.no_grad()
def _capture(layer, states, kw) -> dict[str, torch.Tensor]:
    """Inputs ``(tokens, in)`` of every Linear of ``layer`` over the calibration batches."""
    got: dict[str, list] = {n: [] for n in LINEARS}
    hs = [layer.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]).float())) for n in LINEARS]
    try:
        _run(layer, states, kw)
    finally:
        for h in hs:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def _awq_groups(layer):
    a, m = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    if a.v_proj.out_features == a.o_proj.in_features:
        groups.append((a.v_proj, ["self_attn.o_proj"]))
    groups += [(layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"]), (m.up_proj, ["mlp.down_proj"])]
    return groups


def _act_quant_hook(_m, args):
    x = args[0]
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    return (torch.clamp(torch.round(x / s), -127, 127) * s,) + tuple(args[1:])


@torch.no_grad()
def quantize_layer(layer, inputs: dict[str, torch.Tensor] | None, method: str, bits: int, group_size, *,
                   symmetric=False, zero_point="float", act_order=False, damp=0.01, info=None) -> None:
    """Fake-quantize one decoder layer in place. ``method``: rtn, hqq, gptq, awq, awq+gptq, w8a8, w8a8-smooth."""
    info = info if info is not None else {}
    if method in ("awq", "awq+gptq", "w8a8-smooth"):
        scaled = {}
        for producer, names in _awq_groups(layer):
            if method == "w8a8-smooth" and producer is layer.self_attn.v_proj:
                continue  # SmoothQuant/llm-compressor mappings: q/k/v, gate/up, down
            ws = [layer.get_submodule(n).weight for n in names]
            if method == "w8a8-smooth":
                s, i = smooth_search(inputs[names[0]], ws)
            else:
                s, i = awq_search_scales(inputs[names[0]], ws, bits, group_size, symmetric=symmetric,
                                         zero_point=zero_point)
            info.setdefault("alpha", []).append(i["alpha"])
            if producer.weight.dim() == 1:
                fold_into_norm(producer, s)
                for n in names:
                    layer.get_submodule(n).weight.data.mul_(s)
            else:
                apply_scales(s, [layer.get_submodule(n) for n in names], producer)
            for n in names:
                scaled[n] = inputs[n] / s
        inputs = {**inputs, **scaled}
    for n in LINEARS:
        lin = layer.get_submodule(n)
        w = lin.weight.data.float()
        if method in ("w8a8", "w8a8-smooth"):
            ws = (w.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
            lin.weight.data = (torch.clamp(torch.round(w / ws), -127, 127) * ws).to(lin.weight.dtype)
            lin.register_forward_pre_hook(_act_quant_hook)
            continue
        if method == "rtn":
            gq = rtn(w, bits, group_size, symmetric=symmetric, zero_point=zero_point)
        elif method == "hqq":
            gq = hqq_quantize(w, bits, group_size, zero_point=zero_point)
        elif method == "awq":
            gq = awq_quantize(w, inputs[n], bits, group_size, symmetric=symmetric, zero_point=zero_point,
                              clip=not n.endswith(("q_proj", "k_proj")))
        elif method in ("gptq", "awq+gptq"):
            acc = HessianAccumulator(w.shape[1])
            acc.add(inputs[n])
            h = acc.hessian()
            gq = gptq_quantize(w, h, bits, group_size, symmetric=symmetric, zero_point=zero_point,
                               act_order=act_order, damp=damp)
        else:
            raise ValueError(f"unknown method {method!r}")
        lin.weight.data = gq.dequantize(lin.weight.dtype)


NEEDS_DATA = ("gptq", "awq", "awq+gptq", "w8a8-smooth")


@torch.no_grad()
def fake_quantize_model(model, windows: torch.Tensor | None, method: str, bits: int = 4, group_size=64, *,
                        batch_size: int = 4, **kw) -> dict:
    """Fake-quantize every decoder Linear of ``model`` in place; returns per-layer info (chosen alphas)."""
    layers = model.model.layers
    info: dict = {}
    if method not in NEEDS_DATA:
        for layer in layers:
            quantize_layer(layer, None, method, bits, group_size, info=info, **kw)
        return info
    cache = layer0_inputs(model, windows, batch_size)
    states = [a[0] for a, _ in cache]
    kws = [k for _, k in cache]
    for layer in layers:
        inputs = _capture(layer, states, kws)
        quantize_layer(layer, inputs, method, bits, group_size, info=info, **kw)
        del inputs
        states = _run(layer, states, kws)
    return info
