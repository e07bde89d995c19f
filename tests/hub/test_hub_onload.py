"""Quantize-on-load (quant/onload.py): packed tensors identical to the in-memory path, for every scheme."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from openautoglm import hub
from openautoglm.quant import LINEAR_CLASSES, SCHEMES, QuantConfig, quantize
from openautoglm.quant.onload import quantize_linear


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "static"])  # static: test_hub_stream.py
def test_quantize_on_load_equals_in_memory(scheme, tiny_llama_dir, input_ids):
    config = QuantConfig(scheme=scheme)
    eager = hub.from_pretrained(tiny_llama_dir)
    quantize(eager, config)
    lazy = hub.from_pretrained(tiny_llama_dir, quantization=config)
    assert_same_state(eager, lazy)
    assert lazy.quant_result.quantized == eager.quant_result.quantized
    assert hub.applied_transforms(lazy) == hub.applied_transforms(eager)
    with torch.no_grad():
        assert torch.equal(lazy(input_ids).logits, eager(input_ids).logits)


@pytest.mark.parametrize("scheme,layout", [(s, "groups") for s in SCHEMES] + [("w4", "rows")])
def test_row_blocks_pack_like_the_whole_weight(scheme, layout, monkeypatch):
    """Big weights are quantized in blocks of output rows; every scheme is row-separable, so nothing changes."""
    config = QuantConfig(scheme=scheme, group_size=32 if scheme in ("w4", "w8") else None, layout=layout)
    cls = LINEAR_CLASSES[scheme]
    lin = nn.Linear(96, 80, bias=True)
    whole = cls.from_linear(lin, config)
    calls = []
    real = cls.from_linear.__func__
    monkeypatch.setattr(cls, "from_linear", classmethod(lambda c, *a, **k: calls.append(1) or real(c, *a, **k)))
    blocks = quantize_linear(lin, cls, config, chunk_elements=96 * 32)
    assert len(calls) == 3, "rows 0-32, 32-64, 64-80"
    assert_same_state(whole, blocks)


def test_short_form_and_bad_arguments(tiny_llama_dir):
    m = hub.from_pretrained(tiny_llama_dir, bits=4)
    assert m.quant_result.config.scheme == "w4" and m.quant_result.config.group_size == 128
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        hub.from_pretrained(tiny_llama_dir, bits=3)
    with pytest.raises(ValueError, match="either quantization=.* or bits"):
        hub.from_pretrained(tiny_llama_dir, bits=8, quantization=QuantConfig())
    with pytest.raises(TypeError, match="quantization must be a QuantConfig"):
        hub.from_pretrained(tiny_llama_dir, quantization="w4")


def test_quantized_checkpoint_is_not_quantized_again(tiny_llama_dir, tmp_path):
    hub.from_pretrained(tiny_llama_dir, bits=8).save_pretrained(tmp_path / "q8")
    with pytest.raises(ValueError, match="already quantized"):
        hub.from_pretrained(tmp_path / "q8", bits=4)


def test_static_needs_the_tokenizer(tiny_llama_dir, tmp_path):
    src = tmp_path / "no-tok"
    shutil.copytree(tiny_llama_dir, src)
    for f in src.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ValueError, match="needs the model's tokenizer.*w8a8, w8a8-fp8, w8 or w4"):
        hub.from_pretrained(src, quantization=QuantConfig(scheme="static"))
    assert hub.from_pretrained(src, quantization=QuantConfig(scheme="w8")).quant_result.quantized
