"""quant/api.py + static.py on the tiny Llama: whole-model logits, save -> load, errors, compile, generate."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from openautoglm import AutoModelForCausalLM, DynamicQuantizer, QuantConfig, StaticQuantizer, hub, quantize
from openautoglm.quant import QuantLinear, is_quantized

MIN_COS = {"w8a8": 0.999, "w8a8-fp8": 0.99, "w8": 0.999, "w4": 0.95, "static": 0.995}


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0))


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-fp8", "w8", "w4"])
def test_whole_model_close_and_save_load_identical(scheme, input_ids, tmp_path, tokenizer):
    model = make_tiny_llama()
    with torch.no_grad():
        ref = model(input_ids).logits
    res = quantize(model, QuantConfig(scheme=scheme))
    assert len(res.quantized) == 28 and "lm_head" not in res.quantized and res.bytes_after < res.bytes_before
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        out = model(input_ids).logits
    assert _cos(out, ref) > MIN_COS[scheme]

    model.save_pretrained(tmp_path / "q", tokenizer=tokenizer)
    cfg = (tmp_path / "q" / "config.json").read_text()
    assert '"quantize"' in cfg and f'"scheme": "{scheme}"' in cfg
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(again.model.layers[0].mlp.up_proj) is type(model.model.layers[0].mlp.up_proj)
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, out)
    # the rebuilt structure is exact without reading weights: quantized tensors on the meta device
    empty = hub.empty_model(tmp_path / "q")
    q = empty.model.layers[0].self_attn.q_proj
    assert q.qweight.is_meta and q.qweight.dtype == model.model.layers[0].self_attn.q_proj.qweight.dtype


def test_dynamic_quantizer_short_forms(caplog):
    m = make_tiny_llama()
    assert DynamicQuantizer.quantize(m, bits=8) is m
    assert m.quant_result.config.scheme == "w8a8"  # CPU: int8
    m4 = DynamicQuantizer.quantize(make_tiny_llama(), bits=4)
    assert m4.quant_result.config.scheme == "w4" and m4.quant_result.config.group_size == 128
    for bad in (3, 16, True):
        with pytest.raises(ValueError, match="bits="):
            DynamicQuantizer.quantize(make_tiny_llama(), bits=bad)
    with pytest.raises(ValueError, match="not a 4-bit"):
        DynamicQuantizer.quantize(make_tiny_llama(), bits=4, scheme="w8")


def test_quantizing_twice_is_an_error(tmp_path, tokenizer):
    m = DynamicQuantizer.quantize(make_tiny_llama(), bits=4)
    with pytest.raises(ValueError, match="already quantized"):
        DynamicQuantizer.quantize(m, bits=8)
    m.save_pretrained(tmp_path / "q", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), QuantConfig(scheme="w8"))


def test_nan_weights_leave_model_untouched():
    m = make_tiny_llama()
    m.model.layers[2].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="down_proj.*NaN"):
        quantize(m, QuantConfig(scheme="w8"))
    assert not is_quantized(m)


def test_skipped_layers_reported_and_no_layer_is_an_error(caplog):
    m = make_tiny_llama(intermediate_size=96)  # down_proj in_features 96: not divisible by 64
    with caplog.at_level(logging.WARNING, logger="openautoglm.quant.api"):
        res = quantize(m, QuantConfig(scheme="w4", group_size=64))
    assert set(res.skipped) == {f"model.layers.{i}.mlp.down_proj" for i in range(4)}
    assert all("not divisible" in v for v in res.skipped.values())
    assert "down_proj" in caplog.text
    with pytest.raises(ValueError, match="no Linear layer"):
        quantize(make_tiny_llama(), QuantConfig(scheme="w8", include=("nothing.*",)))
    only_mlp = quantize(make_tiny_llama(), QuantConfig(scheme="w8", include=("*.mlp.*",), exclude=("*.3.*",)))
    assert len(only_mlp.quantized) == 9 and all(".mlp." in n and ".3." not in n for n in only_mlp.quantized)


def test_tied_lm_head_is_skipped_when_included():
    m = make_tiny_llama(tie_word_embeddings=True)
    res = quantize(m, QuantConfig(scheme="w8", exclude=()))
    assert res.skipped.get("lm_head", "").startswith("weight tied")


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_static_calibration(observer, input_ids, tokenizer, tmp_path):
    model = make_tiny_llama()
    with torch.no_grad():
        ref = model(input_ids).logits
    sq = StaticQuantizer(observer=observer)
    g = torch.Generator().manual_seed(5)
    with sq.calibrate(model):
        for _ in range(3):
            model(torch.randint(2, 8192, (2, 32), generator=g))
    assert not model.model.layers[0].mlp.up_proj._forward_pre_hooks  # hooks removed
    sq.quantize(model)
    scale = float(model.model.layers[0].mlp.up_proj.act_scale)
    assert scale > 0
    with torch.no_grad():
        out = model(input_ids).logits
    assert _cos(out, ref) > MIN_COS["static"]
    if observer != "minmax":
        return
    model.save_pretrained(tmp_path / "s", tokenizer=tokenizer)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert float(again.model.layers[0].mlp.up_proj.act_scale) == scale
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, out)


def test_static_on_text_and_errors(tokenizer):
    m = make_tiny_llama()
    StaticQuantizer().quantize(m, tokenizer=tokenizer, text="def f(x):\n    return x + 1\n" * 20, max_tokens=256)
    assert m.quant_result.config.scheme == "static"
    with pytest.raises(ValueError, match="StaticQuantizer"):
        quantize(make_tiny_llama(), QuantConfig(scheme="static"))


def test_generate_static_cache():
    m = DynamicQuantizer.quantize(make_tiny_llama(), bits=4)
    ids = torch.randint(2, 8192, (1, 8))
    out = m.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=1)
    assert out.shape == (1, 14)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w4", "w8a8"])
def test_compile_fullgraph(scheme):
    model = make_tiny_llama()
    quantize(model, QuantConfig(scheme=scheme))
    lin = model.model.layers[0].mlp.up_proj
    compiled = torch.compile(lin, fullgraph=True)  # fullgraph: any graph break raises
    x = torch.randn(1, 3, 128)
    assert torch.allclose(compiled(x), lin(x), rtol=1e-4, atol=1e-4)
