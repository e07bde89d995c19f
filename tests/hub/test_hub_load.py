"""Loading, saving and the loader's error messages (hub/load.py, hub/save.py, hub/validate.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from openautoglm import AutoModelForCausalLM, hub
from openautoglm.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from openautoglm.hub.config import _resolve_dtype


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_load_local_folder_matches_saved(tiny_llama_dir, input_ids):
    from conftest import make_tiny_llama

    ref = make_tiny_llama()
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert type(m).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(m, input_ids), _logits(ref, input_ids))


def test_sharded_save_roundtrip_and_dtype(tiny_llama_dir, tmp_path, input_ids):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    out = m.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file(), "tokenizer files travel with the model"
    assert not list(out.glob("*.bin"))
    m2 = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(m2, input_ids), _logits(m, input_ids))
    m3 = AutoModelForCausalLM.from_pretrained(out, dtype="bf16")
    assert next(m3.parameters()).dtype == torch.bfloat16


def test_interrupted_save_keeps_old_output(tiny_llama_dir, tmp_path, monkeypatch):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    out = m.save_pretrained(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(self, path, **kw):
        Path(path, "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(m), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        hub.save_pretrained(m, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary folder left behind"


def test_save_refuses_to_replace_unrelated_folder(tiny_llama_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        m.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_unknown_model_name_lists_shipped():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'no-such-model'.*open-autoglm-base.*local folder"):
        AutoModelForCausalLM.from_pretrained("no-such-model")


def test_hub_id_is_not_downloaded():
    with pytest.raises(ModelNotFoundError, match="not downloaded"):
        AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig

    BertConfig(architectures=["BertForMaskedLM"], hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM model, not a causal language model"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UnsupportedModelError, match="no 'model_type'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_names_file(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.*model\.safetensors|model\.safetensors.*truncated"):
        AutoModelForCausalLM.from_pretrained(d)


def test_corrupt_safetensors_header_names_file(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "corrupt")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00garbage-not-json" + b"!" * 15
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors file .*model.safetensors"):
        AutoModelForCausalLM.from_pretrained(d)


def test_missing_tensor_is_reported(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_llama_dir, tmp_path / "missing")
    sd = load_file(d / "model.safetensors")
    sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks tensors.*up_proj"):
        AutoModelForCausalLM.from_pretrained(d)


def _pickle_checkpoint(tiny_llama_dir, d: Path) -> None:
    from safetensors.torch import load_file

    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d / "config.json")
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), d / "pytorch_model.bin")


def test_pickle_refused_by_default(tiny_llama_dir, tmp_path):
    _pickle_checkpoint(tiny_llama_dir, tmp_path / "pkl")
    with pytest.raises(CheckpointError, match="pickle.*refused.*allow_pickle=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pkl")


def test_pickle_opt_in_uses_weights_only(tiny_llama_dir, tmp_path, input_ids):
    from conftest import make_tiny_llama

    _pickle_checkpoint(tiny_llama_dir, tmp_path / "pkl")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "pkl", allow_pickle=True)
    torch.testing.assert_close(_logits(m, input_ids), _logits(make_tiny_llama(), input_ids))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_opt_in_still_rejects_code(tiny_llama_dir, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d / "config.json")
    torch.save({"x": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        AutoModelForCausalLM.from_pretrained(d, allow_pickle=True)


def test_bad_dtype_and_type():
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        _resolve_dtype("int3", None)
    with pytest.raises(TypeError, match="name or a folder path"):
        hub.resolve_model_path(42)


def test_trust_remote_code_off_by_default():
    import inspect

    assert inspect.signature(hub.from_pretrained).parameters["trust_remote_code"].default is False
