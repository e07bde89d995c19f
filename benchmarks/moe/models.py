"""Random-weight MoE models of real shapes, built straight on the GPU, quantized layer by layer as they are made.

A Qwen3-30B-A3B-shaped model (48 layers, 128 experts, top-8, hidden 2048, expert width 768; 30.5 B parameters, 61 GB
in bf16) fits one 80 GB GPU in bf16; a Mixtral-8x7B-shaped one (46.7 B, 93 GB in bf16) does not, so it is only ever
materialized one decoder layer at a time and quantized right away (peak: the quantized model + one bf16 layer).
Every tensor is drawn from its own generator seeded by its name, so a layer rebuilt later (the bf16 reference of a
quantized run) holds the same weights.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from openautoglm import QuantConfig, _hf, hub
from openautoglm._util.modules import set_module
from openautoglm.quant.api import new_quantized, select_modules

SHAPES = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                          max_position_embeddings=4096, use_sliding_window=False, tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=14336, num_local_experts=8,
                         num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=4096, sliding_window=None,
                         tie_word_embeddings=False),
    # the same code on the CPU in seconds
    "smoke-qwen3": dict(model_type="qwen3_moe", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, intermediate_size=512, moe_intermediate_size=128,
                        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, vocab_size=1024,
                        max_position_embeddings=4096, use_sliding_window=False, tie_word_embeddings=False),
    "smoke-mixtral": dict(model_type="mixtral", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, intermediate_size=128, num_local_experts=4,
                          num_experts_per_tok=2, vocab_size=1024, max_position_embeddings=4096, sliding_window=None,
                          tie_word_embeddings=False),
}


def config(shape: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(**SHAPES[shape])


def dtype_for(dev) -> torch.dtype:
    """bf16 on the GPU; float32 on the CPU (the smoke run: CPU bf16 matmuls are slow)."""
    return torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32


def empty(shape: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of ``shape`` on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config(shape), dtype=dtype).eval()


@torch.no_grad()
def materialize(module: nn.Module, prefix: str, dev) -> None:
    """Give every meta parameter of ``module`` real random values on ``dev`` (norms 1, the rest N(0, 0.02)),
    each from a generator seeded by its full name: the same name always gets the same values."""
    for name, p in list(module.named_parameters(recurse=True)):
        if not p.is_meta:
            continue
        full = f"{prefix}.{name}" if prefix else name
        g = torch.Generator(device=dev).manual_seed(zlib.crc32(full.encode()))
        mod_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        t = torch.empty(p.shape, dtype=p.dtype, device=dev)
        if "Norm" in type(owner).__name__:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        owner._parameters[attr] = nn.Parameter(t, requires_grad=False)


def build(shape: str, dev, quant: QuantConfig | None = None) -> nn.Module:
    """The model of ``shape`` with random weights on ``dev``: bf16, or quantized with ``quant`` one decoder layer at a
    time as it is made (the selection is openautoglm's, ``select_modules``; the transform is recorded as ``quantize``
    records it, so the model reloads, estimates and routes like any quantized model)."""
    dev = torch.device(dev)
    model = empty(shape, dtype_for(dev))
    layers = _hf.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    chosen_all = []
    for name, mod in model.named_children():  # embeddings, final norm, head: materialize everything but the layers
        if mod is not model.model:
            materialize(mod, name, dev)
    for name, mod in model.model.named_children():
        if mod is not layers:
            materialize(mod, f"model.{name}", dev)
    for i, layer in enumerate(layers):
        materialize(layer, f"{prefix}.{i}", dev)
        if quant is not None:
            chosen, _ = select_modules(layer, quant)
            for n in chosen:
                set_module(layer, n, new_quantized(layer.get_submodule(n), quant))
            chosen_all += [f"{prefix}.{i}.{n}" for n in chosen]
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    _hf.rebuild_rotary_buffers(model, dev)
    for n, b in list(model.named_buffers()):
        if b.device != dev:
            mod_name, _, attr = n.rpartition(".")
            model.get_submodule(mod_name)._buffers[attr] = b.to(dev)
    if quant is not None:
        hub.record_transform(model, "quantize", {"config": quant.to_dict(), "modules": chosen_all})
    hub.plugins.model_ready(model)  # model.generate(cache_implementation="static") -> the compiled decode
    return model


@torch.no_grad()
def layerwise_logits(shape: str, ids: torch.Tensor, dev) -> torch.Tensor:
    """bf16 logits ``(T, vocab)`` (float32) of ``ids (1, T)`` for a model too big for the device: each decoder layer
    is made (same seeds as :func:`build`), run and freed in turn."""
    model = empty(shape, dtype_for(dev))
    layers = _hf.decoder_layers(model)
    for name, mod in model.named_children():
        if mod is not model.model:
            materialize(mod, name, dev)
    for name, mod in model.model.named_children():
        if mod is not layers:
            materialize(mod, f"model.{name}", dev)
    _hf.rebuild_rotary_buffers(model, dev)
    args, kwargs = _hf.decoder_layer_inputs(model, ids)
    h = args[0]
    for i, layer in enumerate(layers):
        materialize(layer, f"model.layers.{i}", dev)
        h = _hf.run_decoder_layer(layer, h, args, kwargs)
        layers[i] = nn.Module()  # free it
    return model.lm_head(_hf.final_norm(model)(h))[0].float()
