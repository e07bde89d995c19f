"""Quantized fused experts (:mod:`openautoglm.quant.experts`) on every MoE family of the fixture.

Each expert is quantized exactly as a Linear of its own weights would be (same codes and scales, per output channel /
group), and the quantized experts compute what transformers' float experts compute with the dequantized weights
(weight-only schemes), or what per-expert quantized Linears compute (w8a8: activations quantized per token too).
"""

from __future__ import annotations

import pytest
import torch
from conftest import MOE_FAMILIES, make_tiny

from openautoglm import QuantConfig, _hf, quantize
from openautoglm.quant.experts import QuantExperts
from openautoglm.quant.linear import LINEAR_CLASSES

SCHEMES = ["w8a8", "w8a8-fp8", "w8", "w4"]


def _experts(family):
    model = make_tiny(family)
    name, mod = next(_hf.moe.experts_modules(model))
    return model, name, mod


def _routing(t=12, e=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    return idx, w


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_expert_quantized_as_its_own_linear(family, scheme):
    _, _, mod = _experts(family)
    cfg = QuantConfig(scheme=scheme)
    q = QuantExperts.from_experts(mod, cfg)
    cls = LINEAR_CLASSES[scheme]
    for which in ("up", "down"):
        w = _hf.moe.weight_out_in(mod, which)
        b = _hf.moe.bias(mod, which)
        for e in range(w.shape[0]):
            lin = torch.nn.Linear(w.shape[2], w.shape[1], bias=b is not None)
            with torch.no_grad():
                lin.weight.copy_(w[e])
                if b is not None:
                    lin.bias.copy_(b[e])
            alone = dict(cls.from_linear(lin, cfg).named_parameters())
            view = dict(q.expert(which, e).named_parameters())
            assert alone.keys() == view.keys()
            for k in alone:
                assert torch.equal(alone[k].view(torch.uint8) if alone[k].dtype.itemsize == 1 else alone[k],
                                   view[k].view(torch.uint8) if view[k].dtype.itemsize == 1 else view[k]), (which, e, k)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_weight_only_experts_equal_float_experts_on_dequantized_weights(family, scheme):
    """The routed computation (gate layout, transposition, biases, the family's gated activation) is transformers'
    own: its float experts module with the dequantized weights gives the same output."""
    _, _, mod = _experts(family)
    q = QuantExperts.from_experts(mod, QuantConfig(scheme=scheme))
    with torch.no_grad():
        for which, stack in (("up", q.gate_up), ("down", q.down)):
            deq = stack.dequantized_weight().reshape(q.num_experts, q.rows(which), -1)
            p = mod._parameters[_hf.moe.up_name(mod) if which == "up" else "down_proj"]
            p.copy_(deq.transpose(-1, -2) if _hf.moe.layout_of(mod).is_transposed else deq)
        x = torch.randn(12, q.hidden_dim, generator=torch.Generator().manual_seed(3))
        idx, w = _routing()
        mod.config._experts_implementation = "eager"
        ref = mod(x, idx, w)
        out = q(x, idx, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-fp8"])
def test_w8a8_experts_equal_per_expert_quantized_linears(family, scheme):
    _, _, mod = _experts(family)
    q = QuantExperts.from_experts(mod, QuantConfig(scheme=scheme))
    x = torch.randn(12, q.hidden_dim, generator=torch.Generator().manual_seed(3))
    idx, w = _routing()
    ref = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                h = q.apply_gate(q.expert("up", e)(x[t:t + 1]))
                ref[t] += (q.expert("down", e)(h) * w[t, j])[0]
        out = q(x, idx, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_router_stays_float_and_shared_expert_is_quantized():
    model = make_tiny("qwen2_moe")
    res = quantize(model, QuantConfig(scheme="w4"))
    block = _hf.moe.moe_block(_hf.decoder_layers(model)[0])
    assert type(block.gate.weight) is torch.nn.Parameter and block.gate.weight.is_floating_point()
    assert isinstance(block.experts, QuantExperts)
    assert "model.layers.0.mlp.shared_expert.down_proj" in res.quantized
    assert "model.layers.0.mlp.experts" in res.quantized


def test_experts_excluded_by_pattern_and_unsupported_shapes_named():
    model = make_tiny("mixtral")
    res = quantize(model, QuantConfig(scheme="w8", exclude=("lm_head", "*.experts")))
    assert not any(n.endswith("experts") for n in res.quantized)
    model = make_tiny("mixtral", intermediate_size=72)  # 72 is not a multiple of 16 (nor of the w4 group)
    res = quantize(model, QuantConfig(scheme="w8"))
    assert "multiple of 16" in res.skipped["model.layers.0.mlp.experts"]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_quantize_on_load_and_streaming_save_of_moe_checkpoints(family, tmp_path):
    """A checkpoint storing experts one by one (Mixtral: block_sparse_moe.experts.N.w1/w3/w2) or fused and transposed
    (GPT-OSS): quantize-on-load and the streaming checkpoint-to-checkpoint path give the modules of quantizing the
    loaded model (w4: asymmetric, zero points packed two rows a byte, filled one expert's gate and up rows at a
    time), and the streamed checkpoint reloads to the same logits."""
    from openautoglm import AutoModelForCausalLM
    from openautoglm.quant import quantize_pretrained, quantized_layers

    make_tiny(family).save_pretrained(tmp_path / "f")
    cfg = QuantConfig(scheme="w4")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    quantize(after, cfg)
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization=cfg)
    res = quantize_pretrained(tmp_path / "f", tmp_path / "s", cfg)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert any(n.endswith("mlp.experts") for n in res.quantized)
    sd = after.state_dict()
    for m in (on_load, streamed):
        assert quantized_layers(m) == quantized_layers(after)
        other = m.state_dict()
        assert sd.keys() == other.keys() and all(torch.equal(sd[k], other[k]) for k in sd)
    x = torch.randint(2, 8192, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, after(x).logits)
