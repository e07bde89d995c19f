"""The estimator takes per-layer mixed recipes: several QuantConfigs (include patterns) and per-layer KV widths."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, make_tiny_llama

from openautoglm import _hf
from openautoglm.kv import KVCacheConfig
from openautoglm.memory import estimate_memory, model_bytes
from openautoglm.memory.mixed import quantized_linear_workspace
from openautoglm.quant import QuantConfig, quantize

MIXED = [QuantConfig(scheme="w4", group_size=64, include=("model.layers.0.*", "model.layers.1.mlp.*"), exclude=()),
         QuantConfig(scheme="w8", include=("model.layers.2.*", "lm_head"), exclude=())]


def test_mixed_quantization_weights_exact():
    model = make_tiny_llama(0, torch.bfloat16)
    est = estimate_memory(model, quantization=MIXED, seq_len=256, batch=2)
    assert model_bytes(model) == model_bytes(make_tiny_llama(0, torch.bfloat16))  # the model is untouched
    for cfg in MIXED:
        quantize(model, cfg)
    assert abs(est.terms["weights"] - model_bytes(model)) <= 64  # rotary buffers: shared storage vs meta tensors
    # the same figure from the quantized model itself, and from dicts
    assert abs(estimate_memory(model, seq_len=256, batch=2).terms["weights"] - est.terms["weights"]) <= 64
    assert estimate_memory(make_tiny_llama(0, torch.bfloat16), quantization=[c.to_dict() for c in MIXED],
                           seq_len=256, batch=2).terms["weights"] == est.terms["weights"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_estimate_selects_the_layers_quantize_selects(family):
    """One selector: the estimator's meta-model surgery (mixed recipes) quantizes exactly the modules
    ``quantize`` does -- GPT-2's Conv1D projections included -- so their weight bytes agree."""
    from openautoglm.memory.mixed import apply_quant_structure, meta_copy
    from openautoglm.quant.api import quantized_layers

    cfgs = [QuantConfig(scheme="w4", group_size=32, include=("*.h.0.*", "model.layers.0.*"), exclude=()),
            QuantConfig(scheme="w8")]
    model = make_tiny(family)
    planned = apply_quant_structure(meta_copy(model), cfgs)
    for cfg in cfgs:
        quantize(model, QuantConfig.from_dict({**cfg.to_dict(), "exclude": [*cfg.exclude, *quantized_layers(model)]}))
    assert planned == quantized_layers(model) and planned
    est = estimate_memory(make_tiny(family), quantization=cfgs, seq_len=64, batch=1)
    assert abs(est.terms["weights"] - model_bytes(model)) <= 64


def test_per_layer_kv_bytes_match_the_cache():
    model = make_tiny_llama(0, torch.float32)
    bits = [8, 4, None, 2]
    ids = torch.randint(2, 8192, (2, 300), generator=torch.Generator().manual_seed(0))
    cache = KVCacheConfig(bits=tuple(bits)).build(model.config, context=300)
    with torch.no_grad():
        _hf.forward_with_cache(model, ids, cache)
    est = estimate_memory(model, seq_len=300, batch=2, kv_dtype=bits)
    assert est.terms["kv_cache"] == cache.nbytes()
    uniform = KVCacheConfig(bits=4).build(model.config, context=300)
    with torch.no_grad():
        _hf.forward_with_cache(model, ids, uniform)
    assert estimate_memory(model, seq_len=300, batch=2, kv_dtype="int4").terms["kv_cache"] == uniform.nbytes()


def test_workspace_of_quantized_layers():
    model = make_tiny_llama(0, torch.bfloat16)
    w8a8 = estimate_memory(model, quantization=[QuantConfig(scheme="w8a8", include=("model.layers.0.mlp.*",))],
                           seq_len=512, batch=2)
    # the int8 GEMM's int32 accumulator and fp32 rescaling of the widest layer (gate/up: 128 -> 256)
    assert w8a8.terms["workspace"] == quantized_linear_workspace("w8a8", 1024, 128, 256, 2) == 1024 * 128 + 12 * 1024 * 256
    w4 = estimate_memory(model, quantization=[QuantConfig(scheme="w4", include=("model.layers.0.mlp.*",))], seq_len=512)
    assert w4.terms["workspace"] == 256 * 128 * 2   # one dequantized weight (CUDA)
    cpu = estimate_memory(model, quantization=[QuantConfig(scheme="w4", include=("model.layers.0.mlp.*",))], seq_len=512,
                          device="cpu")
    assert cpu.terms["workspace"] == 256 * 128 * (1 + 3 * 2)
    assert "workspace" not in estimate_memory(model, seq_len=512).terms


def test_bad_mixed_inputs():
    model = make_tiny_llama(0, torch.bfloat16)
    with pytest.raises(ValueError, match="one per layer"):
        estimate_memory(model, kv_dtype=[4, 4])
    with pytest.raises(ValueError, match="KV entry"):
        estimate_memory(model, kv_dtype=[4, 4, 3, 4])
    with pytest.raises(TypeError, match="QuantConfig"):
        estimate_memory(model, quantization=["w4"])
    with pytest.raises(ValueError, match="training a quantized"):
        estimate_memory(model, mode="train", quantization=MIXED)
    with pytest.raises(ValueError, match="device"):
        estimate_memory(model, device="tpu:x")
