"""``openautoglm compress``: writes a reloadable checkpoint, prints the memory table, clear usage errors."""

from __future__ import annotations

import torch

from openautoglm import AutoModelForCausalLM, hub
from openautoglm.cli import main
from openautoglm.quant import QuantLinear


def test_compress_bits4_and_reload(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "w4"
    code = main(["compress", str(tiny_llama_dir), "--bits", "4", "--group-size", "64", "--exclude", "lm_head",
                 "--exclude", "*.0.*", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "weights in memory" in text and "w4" in text
    m = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(m.model.layers[1].mlp.up_proj, QuantLinear)
    assert not isinstance(m.model.layers[0].mlp.up_proj, QuantLinear)
    assert m(torch.randint(2, 8192, (1, 5))).logits.shape == (1, 5, 8192)


def test_compress_static_with_text(tiny_llama_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("for i in range(10):\n    print(i * i)\n" * 30)
    code = main(["compress", str(tiny_llama_dir), "--bits", "8", "--scheme", "static", "--observer", "percentile",
                 "--calib-text", str(calib), "--out", str(tmp_path / "st")])
    assert code == 0, capsys.readouterr().out
    assert (tmp_path / "st" / "config.json").read_text().count('"static"') == 1


def test_compress_usage_errors(tiny_llama_dir, tmp_path, capsys):
    assert main(["compress", str(tiny_llama_dir), "--bits", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--bits 3" in capsys.readouterr().err
    assert main(["compress", str(tiny_llama_dir), "--bits", "4", "--scheme", "w8a8", "--out", str(tmp_path / "x")]) == 2
    assert main(["compress", str(tiny_llama_dir), "--bits", "4", "--group-size", "100", "--out", str(tmp_path / "x")]) == 2
    assert "group_size=100" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sparsity_alone_does_not_quantize(tiny_llama_dir, tmp_path, capsys):
    """Issue 14, defect 3: `compress --sparsity 0.5` prunes only; quantization needs --bits or --scheme."""
    out = tmp_path / "sparse"
    code = main(["compress", str(tiny_llama_dir), "--sparsity", "0.5", "--sparsity-method", "magnitude",
                 "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "not quantized" in text and "weights left unquantized" in text
    m = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    assert [t["type"] for t in hub.applied_transforms(m)] == ["sparsity"]
    w = m.model.layers[0].mlp.up_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01


def test_scheme_alone_quantizes_and_tuning_options_need_bits(tiny_llama_dir, tmp_path, capsys):
    assert main(["compress", str(tiny_llama_dir), "--scheme", "w8", "--out", str(tmp_path / "w8")]) == 0
    capsys.readouterr()
    assert hub.applied_transforms(AutoModelForCausalLM.from_pretrained(tmp_path / "w8"))[0]["config"]["scheme"] == "w8"
    assert main(["compress", str(tiny_llama_dir), "--sparsity", "0.5", "--group-size", "64",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--group-size only tune quantization" in capsys.readouterr().err
    assert main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
