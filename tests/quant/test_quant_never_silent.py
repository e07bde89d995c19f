"""Never silent (issue 24): after quantizing, every float tensor above 1% of the model's bytes is reported with the
reason, the experts really are 4-bit, and ``info`` / ``compress`` say so."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tiny

from openautoglm import QuantConfig, quantize
from openautoglm.cli import main
from openautoglm.memory import model_bytes

# hidden 256, 16 experts of width 256, vocabulary 256: the experts dominate as in real MoE models (embeddings and
# lm_head: 2.0% of Qwen3-30B-A3B's bytes, 0.6% of Mixtral-8x7B's; 1.9% here), so the ratio shows what w4 does to them
BIG_EXPERTS = dict(vocab_size=256, hidden_size=256, head_dim=32, intermediate_size=256, moe_intermediate_size=256)


@pytest.mark.parametrize("family,experts", [("mixtral", {"num_local_experts": 16}), ("qwen3_moe", {"num_experts": 16})])
def test_w4_moe_weights_below_0_30x_bf16_and_nothing_big_silently_float(family, experts):
    model = make_tiny(family, dtype=torch.bfloat16, **BIG_EXPERTS, **experts)
    before = model_bytes(model)
    res = quantize(model, QuantConfig(scheme="w4"))
    ratio = model_bytes(model) / before
    # measured 0.275x on both: w4 g128 codes with their bf16 scales and packed zero points are 0.266x of bf16; the bf16
    # embeddings and lm_head (1.9% of the bf16 bytes) make up the rest
    assert ratio <= 0.30, ratio
    assert set(res.full_precision) == {"model.embed_tokens.weight", "lm_head.weight"}, res.full_precision
    assert res.full_precision["lm_head.weight"]["reason"].startswith("lm_head not selected by the patterns")
    assert not res.skipped


def test_unknown_big_parameter_is_reported_with_a_warning(caplog):
    """A big float parameter in a layout openautoglm cannot quantize (here a made-up 3-D tensor) is named, not hidden."""
    model = make_tiny("mixtral")
    model.model.layers[0].extra = torch.nn.Module()
    model.model.layers[0].extra.table = torch.nn.Parameter(torch.zeros(4, 128, 256))
    with caplog.at_level(logging.INFO, logger="openautoglm.quant.report"):
        res = quantize(model, QuantConfig(scheme="w8"))
    why = res.full_precision["model.layers.0.extra.table"]["reason"]
    assert "a layout openautoglm has no quantized form for" in why
    assert any(r.levelno == logging.WARNING and "extra.table" in r.getMessage() for r in caplog.records)
    assert "model.embed_tokens.weight" in res.full_precision and res.to_dict()["full_precision"]


def test_info_and_compress_show_experts(tmp_path, capsys, tokenizer):
    from openautoglm import hub

    hub.save_pretrained(make_tiny("mixtral"), tmp_path / "m", tokenizer=tokenizer)
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    # 4 experts, top-2: a token runs half of each layer's experts (2 layers x 4 x (256 + 128) x 128 / 2 = 196,608 fewer)
    assert "parameters per token (active)" in out and "2,377,344" in out and "4 per layer in 2 MoE layers, top-2" in out
    assert "experts' share of the bytes" in out
    assert main(["compress", str(tmp_path / "m"), "--bits", "4", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "left in full precision" in out and "model.embed_tokens.weight" in out and "lm_head.weight" in out
