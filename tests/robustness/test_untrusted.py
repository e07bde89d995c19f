"""Untrusted code and data: custom code in a model folder never runs unless trust_remote_code is passed,
pickle is refused by default and never executes (weights_only=True even with allow_pickle), names in a
folder cannot reach outside it, and an existing output folder is not replaced without --overwrite.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from openautoglm import hub
from openautoglm.cli import main
from openautoglm.errors import CheckpointError, OpenAutoGLMError, OutputExistsError

from ._support import assert_intact, case, leftovers, snapshot

pytestmark = pytest.mark.timeout(300)

EVIL = """
import pathlib
pathlib.Path({sentinel!r}).write_text("custom code ran")
from transformers import {base}
class {cls}({base}):
    pass
"""


def _plant_code(d: Path, sentinel: Path, *, model_type: str) -> None:
    """config.json with auto_map entries whose modules write ``sentinel`` when imported."""
    (d / "configuration_evil.py").write_text(EVIL.format(sentinel=str(sentinel), base="LlamaConfig", cls="EvilConfig")
                                             + "    model_type = 'evilnet'\n")
    (d / "modeling_evil.py").write_text(EVIL.format(sentinel=str(sentinel), base="LlamaForCausalLM",
                                                    cls="EvilForCausalLM"))
    (d / "tokenization_evil.py").write_text(EVIL.format(sentinel=str(sentinel), base="PreTrainedTokenizerFast",
                                                        cls="EvilTokenizer"))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=["EvilForCausalLM"], auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (d / "tokenizer_config.json").write_text(json.dumps(tc))


@pytest.mark.parametrize("model_type", ["evilnet", "llama"], ids=["unknown-type", "known-type"])
def test_custom_code_is_not_executed(model_type, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    d = tmp_path / "custom"
    shutil.copytree(tiny_llama_dir, d)
    sentinel = tmp_path / "SENTINEL"
    _plant_code(d, sentinel, model_type=model_type)
    calls = [
        ("from_pretrained", lambda: hub.from_pretrained(d)),
        ("empty_model", lambda: hub.empty_model(d)),
        ("load_tokenizer", lambda: hub.load_tokenizer(d)),
        ("estimate_memory", lambda: __import__("openautoglm").estimate_memory(d)),
        ("cli info", lambda: main(["info", str(d)])),
        ("cli estimate", lambda: main(["estimate", str(d)])),
        ("cli compress", lambda: main(["compress", str(d), "--bits", "8", "--out", str(tmp_path / "out")])),
    ]
    for label, call in calls:
        with case("untrusted", f"custom code ({model_type}): {label}"):
            try:
                res = call()
            except OpenAutoGLMError as e:  # refused: the folder needs its code (the tokenizer in both folders)
                assert (model_type == "evilnet" or "tokenizer" in label) and "trust_remote_code" in str(e), f"{label}: {e}"
            else:
                err = capsys.readouterr().err
                if label.startswith("cli") and (model_type == "evilnet" or "compress" in label):
                    assert res == 2 and "trust_remote_code" in err, f"{label}: exit {res}: {err}"
            assert not sentinel.exists(), f"{label} executed the folder's custom code"
    capsys.readouterr()


class _Sentinel:
    path = ""

    def __reduce__(self):
        return (Path(self.path).write_text, ("pickle code ran",))


@pytest.mark.parametrize("layout", ["bin", "bin-index", "pt", "disguised-safetensors"])
def test_malicious_pickle_never_runs(layout, tiny_llama_dir, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d / "config.json")
    sentinel = tmp_path / "SENTINEL"
    evil = _Sentinel()
    evil.path = str(sentinel)
    payload = {"model.embed_tokens.weight": torch.zeros(2), "x": evil}
    name = {"bin": "pytorch_model.bin", "bin-index": "pytorch_model-00001-of-00001.bin", "pt": "model.pt",
            "disguised-safetensors": "model.safetensors"}[layout]
    torch.save(payload, d / name)
    if layout == "bin-index":
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
    for allow in (False, True):
        with case("untrusted", f"pickle {layout} allow_pickle={allow}"):
            with pytest.raises(CheckpointError) as ei:
                hub.from_pretrained(d, allow_pickle=allow)
            msg = str(ei.value)
            if layout == "disguised-safetensors":
                assert "model.safetensors" in msg
            elif not allow:
                assert "refused" in msg and "allow_pickle=True" in msg
            else:
                assert "weights_only=True" in msg
            assert not sentinel.exists(), "unpickling ran code"


def test_names_cannot_escape_the_folder(tiny_llama_dir, tmp_path):
    """Shard names in an index (safetensors or pickle) with ../, absolute paths, or links to non-files."""
    secret = tmp_path / "secret.safetensors"
    shutil.copy(next(tiny_llama_dir.glob("*.safetensors")), secret)
    cases = {
        "dotdot": "../secret.safetensors",
        "absolute": str(secret),
        "subfolder": "sub/model.safetensors",
        "dotdot-bin": "../secret.bin",
    }
    for label, name in cases.items():
        with case("untrusted", f"shard name {label}"):
            d = tmp_path / label
            d.mkdir()
            shutil.copy(tiny_llama_dir / "config.json", d / "config.json")
            index = "pytorch_model.bin.index.json" if label.endswith("bin") else "model.safetensors.index.json"
            (d / index).write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": name}}))
            if label.endswith("bin"):
                (d / "pytorch_model.bin").write_bytes(b"")
            with pytest.raises(CheckpointError, match=index.replace(".", r"\.")):
                hub.from_pretrained(d, allow_pickle=True)
    if hasattr(os, "mkfifo"):
        with case("untrusted", "shard is a FIFO (would block a reader)"):
            d = tmp_path / "fifo"
            d.mkdir()
            shutil.copy(tiny_llama_dir / "config.json", d / "config.json")
            os.mkfifo(d / "model.safetensors")
            with pytest.raises(CheckpointError, match="model.safetensors"):
                hub.from_pretrained(d)
    with case("untrusted", "shard links to a folder"):
        d = tmp_path / "dirlink"
        shutil.copytree(tiny_llama_dir, d)
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").symlink_to(tmp_path, target_is_directory=True)
        with pytest.raises(CheckpointError, match="model.safetensors"):
            hub.from_pretrained(d)


def test_output_symlink_is_refused(tiny_llama_dir, tmp_path):
    """An output name that is a symbolic link (dangling or to a model folder) is not followed."""
    m = hub.from_pretrained(tiny_llama_dir)
    elsewhere = tmp_path / "elsewhere"
    for label, target in (("dangling", tmp_path / "nowhere"), ("to-model", tiny_llama_dir)):
        with case("untrusted", f"output symlink {label}"):
            link = tmp_path / f"link-{label}"
            link.symlink_to(target, target_is_directory=True)
            before = snapshot(tiny_llama_dir)
            with pytest.raises(ValueError, match="symbolic link"):
                hub.save_pretrained(m, link, overwrite=True)
            assert not (tmp_path / "nowhere").exists() and not elsewhere.exists()
            assert_intact(tiny_llama_dir, before, "save through a symlinked output name")


def test_existing_output_needs_overwrite(tiny_llama_dir, tmp_path, capsys):
    """API and CLI (compress, prune): an existing output folder is kept byte for byte unless overwrite is given;
    with it the folder is replaced atomically; a folder that is not a model is never replaced."""
    from openautoglm import DynamicQuantizer

    out = tmp_path / "out"
    hub.save_pretrained(hub.from_pretrained(tiny_llama_dir), out)
    before = snapshot(out)
    m = hub.from_pretrained(tiny_llama_dir)
    DynamicQuantizer.quantize(m, bits=8)
    with case("untrusted", "API save over an existing folder"):
        with pytest.raises(OutputExistsError, match="overwrite"):
            m.save_pretrained(out)
        assert_intact(out, before, "API save without overwrite")
    for argv, label in ((["compress", str(tiny_llama_dir), "--bits", "8"], "compress"),
                        (["prune", str(tiny_llama_dir), "--sparsity", "0.5", "--sparsity-method", "magnitude"], "prune")):
        with case("untrusted", f"cli {label} over an existing folder"):
            code = main(argv + ["--out", str(out)])
            err = capsys.readouterr().err
            assert code == 2 and "--overwrite" in err and str(out) in err.replace("\n", ""), err
            assert "Errno" not in err, err  # the message and the path, not the OSError's repr
            assert_intact(out, before, f"{label} without --overwrite")
    with case("untrusted", "cli compress --overwrite replaces atomically"):
        assert main(["compress", str(tiny_llama_dir), "--bits", "8", "--out", str(out), "--overwrite"]) == 0
        capsys.readouterr()
        assert snapshot(out) != before and hub.from_pretrained(out) is not None
        assert leftovers(tmp_path, {"out"}) == []
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with case("untrusted", "cli compress --overwrite over a non-model folder"):
        code = main(["compress", str(tiny_llama_dir), "--bits", "8", "--out", str(notes), "--overwrite"])
        assert code == 2 and "refusing to replace" in capsys.readouterr().err
        assert (notes / "todo.txt").read_text() == "keep me"
