"""Defect 1 of issue 14: transforms recorded on the model's own config; "already quantized" from the modules.

Two models built from one config object must not share their transform log; a partly quantized model can be
quantized further on its remaining float layers with another config, and the checkpoint rebuilds both.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig, LlamaForCausalLM

from openautoglm import AutoModelForCausalLM, QuantConfig, hub, quantize
from openautoglm.quant import is_quantized, quantized_layers


def _pair_from_one_config():
    cfg = LlamaConfig(**TINY_LLAMA)
    torch.manual_seed(0)
    a = LlamaForCausalLM(cfg).eval()
    torch.manual_seed(1)
    b = LlamaForCausalLM(cfg).eval()
    return cfg, a, b


def test_shared_config_is_not_marked(tmp_path, tokenizer):
    cfg, a, b = _pair_from_one_config()
    quantize(a, QuantConfig(scheme="w8"))
    assert is_quantized(a) and not is_quantized(b)
    assert hub.applied_transforms(a) and not hub.applied_transforms(b) and not hub.applied_transforms(cfg)
    assert a.config is not cfg and b.config is cfg
    # every submodule of `a` that held the shared config now holds a's copy (one config per model)
    held = {id(m.config) for m in a.modules() if isinstance(m.__dict__.get("config"), type(cfg))}
    assert held == {id(a.config)}
    quantize(b, QuantConfig(scheme="w4"))  # the second model quantizes as any float model does
    assert {t["config"]["scheme"] for t in hub.applied_transforms(b) if t["type"] == "quantize"} == {"w4"}
    b2 = LlamaForCausalLM(cfg)  # a third model from the same config is still clean
    assert not hub.applied_transforms(b2)


def test_unquantized_sibling_saves_clean_config(tmp_path, tokenizer):
    _, a, b = _pair_from_one_config()
    quantize(a, QuantConfig(scheme="w8a8"))
    hub.save_pretrained(b, tmp_path / "b", tokenizer=tokenizer)
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert "openautoglm" not in saved or not saved["openautoglm"].get("transforms")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert not is_quantized(again)
    ids = torch.randint(2, 8192, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, b(ids).logits)


def test_partly_quantized_model_takes_a_second_config(tmp_path, tokenizer):
    _, model, _ = _pair_from_one_config()
    ids = torch.randint(2, 8192, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    first = quantize(model, QuantConfig(scheme="w8", include=("*.mlp.*",)))
    assert all(".mlp." in n for n in first.quantized)
    # the same layers again: refused, naming a layer and its scheme
    with pytest.raises(ValueError, match=r"already quantized on 12 of the selected layers: .*mlp.*\(w8\)"):
        quantize(model, QuantConfig(scheme="w4", include=("*.mlp.*",)))
    # the default include="*" overlaps the MLP layers: refused too, nothing changed
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, QuantConfig(scheme="w4"))
    assert set(quantized_layers(model).values()) == {"w8"}
    second = quantize(model, QuantConfig(scheme="w4", group_size=64, include=("*.self_attn.*",)))
    assert len(second.quantized) == 16
    layers = quantized_layers(model)
    assert {layers[n] for n in first.quantized} == {"w8"} and {layers[n] for n in second.quantized} == {"w4"}
    with torch.no_grad():
        out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), 0)
    assert cos > 0.95

    model.save_pretrained(tmp_path / "mixed", tokenizer=tokenizer)
    recorded = [t["config"]["scheme"] for t in hub.applied_transforms(json.loads(
        (tmp_path / "mixed" / "config.json").read_text()))]
    assert recorded == ["w8", "w4"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed")
    assert quantized_layers(again) == layers
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)
    # the reloaded model can take a third config on what is still float (lm_head, once not excluded)
    quantize(again, QuantConfig(scheme="w8", include=("lm_head",), exclude=()))
    assert quantized_layers(again)["lm_head"] == "w8"
