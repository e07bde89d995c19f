"""Hub ids (hub/names.py): ``org/name`` resolved through huggingface_hub's cache; offline, nothing downloaded."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch

from openautoglm import hub
from openautoglm.cli import main
from openautoglm.errors import ModelNotFoundError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tiny_llama_dir, tmp_path, monkeypatch):
    """A Hugging Face cache holding ``tiny-org/tiny-llama`` (refs/main -> one snapshot), used offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_hub_id_resolves_from_the_cache(hub_cache, tiny_llama_dir, input_ids):
    path = hub.resolve_model_path("tiny-org/tiny-llama")
    assert path == hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert hub.resolve_model_path("tiny-org/tiny-llama", revision=COMMIT) == path
    m = hub.from_pretrained("tiny-org/tiny-llama")
    ref = hub.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        assert torch.equal(m(input_ids).logits, ref(input_ids).logits)
    assert hub.load_tokenizer("tiny-org/tiny-llama").vocab_size == 8192


def test_hub_id_through_the_cli(hub_cache, tmp_path):
    assert main(["compress", "tiny-org/tiny-llama", "--bits", "4", "--out", str(tmp_path / "q4")]) == 0
    assert hub.applied_transforms(hub.from_pretrained(tmp_path / "q4"))[-1]["config"]["scheme"] == "w4"


def test_unknown_hub_id_is_a_clear_error(hub_cache):
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'tiny-org/missing'.*Hugging Face cache.*HF_HUB_OFFLINE"):
        hub.from_pretrained("tiny-org/missing")
    with pytest.raises(ModelNotFoundError, match="revision 'v9'"):
        hub.resolve_model_path("tiny-org/tiny-llama", revision="v9")
    with pytest.raises(ModelNotFoundError, match="unknown model 'not a/valid id'"):
        hub.resolve_model_path("not a/valid id")


def test_downloads_only_safe_files(monkeypatch, tmp_path):
    """What a download would fetch: safetensors, json and tokenizer files; pickles and code only when allowed."""
    import huggingface_hub

    seen = []

    def fake_download(repo_id, **kwargs):
        seen.append(kwargs["allow_patterns"])
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "config.json").write_text("{}")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    hub.resolve_model_path("org/model")
    hub.resolve_model_path("org/model", allow_pickle=True, trust_remote_code=True)
    assert "*.safetensors" in seen[0] and not {"*.bin", "*.pt", "*.py"} & set(seen[0])
    assert {"*.bin", "*.py"} <= set(seen[1])
