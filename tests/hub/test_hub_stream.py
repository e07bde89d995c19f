"""Streaming save (hub/writer.py) and checkpoint-to-checkpoint quantization (quant/pretrained.py, CLI compress)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from openautoglm import hub
from openautoglm.cli import main
from openautoglm.errors import CheckpointError
from openautoglm.hub.writer import StreamingWriter
from openautoglm.quant import QuantConfig, StaticQuantizer, quantize, quantize_pretrained

CALIB = ("The tokenizer splits this text into a few hundred tokens. " * 40).strip()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _assert_same_files(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].reshape(-1).view(torch.uint8),
                                                          tb[k].reshape(-1).view(torch.uint8)), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("scheme", ["w4", "static"])
def test_streamed_checkpoint_equals_in_memory_save(scheme, tiny_llama_dir, tokenizer, tmp_path, input_ids):
    config = QuantConfig(scheme=scheme)
    eager = hub.from_pretrained(tiny_llama_dir)
    if scheme == "static":  # whole model on the text vs layer by layer on the same text
        StaticQuantizer().quantize(eager, tokenizer=tokenizer, text=CALIB)
    else:
        quantize(eager, config)
    eager.save_pretrained(tmp_path / "eager")
    r = quantize_pretrained(tiny_llama_dir, tmp_path / "stream", config, calib_text=CALIB, max_shard_size="300KB")
    assert r.path == (tmp_path / "stream").resolve() and r.quantized == eager.quant_result.quantized
    _assert_same_files(tmp_path / "eager", tmp_path / "stream")
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "stream").glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert (tmp_path / "stream" / "tokenizer.json").is_file()
    reloaded = hub.from_pretrained(tmp_path / "stream")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, eager(input_ids).logits)


def test_writer_refuses_missing_and_unplanned_tensors(tiny_llama_dir, tmp_path):
    model = hub.from_pretrained(tiny_llama_dir)
    w = StreamingWriter(tmp_path, model, 10**9)
    with pytest.raises(CheckpointError, match="not part of this checkpoint"):
        w.write("no.such.weight", torch.zeros(1))
    w.write("model.norm.weight", model.model.norm.weight)
    with pytest.raises(CheckpointError, match="never written: lm_head.weight"):
        w.close()


def test_truncated_shard_names_it_and_leaves_no_output(tiny_llama_dir, tmp_path):
    src = tmp_path / "src"
    hub.from_pretrained(tiny_llama_dir).save_pretrained(src, max_shard_size="1MB")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"truncated.*{shard.name}|{shard.name}.*truncated"):
        quantize_pretrained(src, tmp_path / "out", bits=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "no output and no temporary folder"
    assert main(["compress", str(src), "--bits", "4", "--out", str(tmp_path / "out")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_interrupted_run_keeps_previous_output(tiny_llama_dir, tmp_path, monkeypatch):
    out = quantize_pretrained(tiny_llama_dir, tmp_path / "out", bits=8).path
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def interrupt(self, model, unit):
        calls.append(unit)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(StreamingWriter, "write_unit", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize_pretrained(tiny_llama_dir, out, bits=4, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder left behind"


def test_cli_compresses_a_folder_without_tokenizer(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "no-tok"
    shutil.copytree(tiny_llama_dir, src)
    for f in src.glob("tokenizer*"):
        f.unlink()
    assert main(["compress", str(src), "--bits", "4", "--out", str(tmp_path / "q4")]) == 0
    assert "no tokenizer files" in capsys.readouterr().out
    assert hub.applied_transforms(hub.from_pretrained(tmp_path / "q4"))[-1]["config"]["scheme"] == "w4"
    assert not list((tmp_path / "q4").glob("tokenizer*"))
    assert main(["compress", str(src), "--scheme", "static", "--out", str(tmp_path / "st")]) == 2
    assert "needs the model's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()
