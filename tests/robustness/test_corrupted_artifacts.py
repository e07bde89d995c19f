"""Corrupted artifacts: every way a checkpoint folder can be damaged gives a clear error naming the file,
through the API (``from_pretrained`` / ``load_tokenizer``) and the CLI (``compress``, ``info``), and nothing
is written: no output folder, no temporary folder left next to it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from openautoglm import hub
from openautoglm.cli import main
from openautoglm.errors import OpenAutoGLMError

from ._support import case, check_clear_error, leftovers

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------- file surgery

def read_st(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(f: Path, header: dict, data: bytes, *, length: int | None = None) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


def edit_header(f: Path, fn) -> None:
    header, data = read_st(f)
    fn(header)
    write_st(f, header, data)


def first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _shift_last_past_end(h):
    k = last_tensor(h)
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = [b + 4096, e + 4096]


def _overlap(h):
    a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + h[b]["data_offsets"][1]
                            - h[b]["data_offsets"][0]]


def _retype(f: Path, name_part: str, fn) -> None:
    """Replace the tensor whose name contains ``name_part`` by ``fn(tensor)`` (a safetensors rewrite)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(f)
    k = next(k for k in sd if name_part in k)
    sd[k] = fn(sd[k])
    save_file(sd, f, metadata={"format": "pt"})


def _config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _shard(d: Path) -> Path:
    """The shard holding layer 0's attention (several tensors, Linear weights among them)."""
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.self_attn.q_proj.weight"]


# (id, what the error must name, damage(folder)); the folder is a 3-shard copy of the tiny Llama
CASES = [
    ("truncated-half", "SHARD", lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[: _shard(d).stat().st_size // 2])),
    ("truncated-1-byte", "SHARD", lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:-1])),
    ("padded-1-byte", "SHARD", lambda d: _shard(d).write_bytes(_shard(d).read_bytes() + b"\0")),
    ("empty-file", "SHARD", lambda d: _shard(d).write_bytes(b"")),
    ("header-length-absurd", "SHARD", lambda d: write_st(_shard(d), *read_st(_shard(d)), length=2**60)),
    ("header-length-off-by-8", "SHARD", lambda d: write_st(_shard(d), *read_st(_shard(d)),
                                                          length=len(json.dumps(read_st(_shard(d))[0])) + 16)),
    ("header-not-json", "SHARD", lambda d: write_st(_shard(d), {}, b"") or _shard(d).write_bytes(
        struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)),
    ("header-a-list", "SHARD", lambda d: _shard(d).write_bytes(struct.pack("<Q", 8) + b"[1,2,3] ")),
    ("offsets-past-end", "SHARD", lambda d: edit_header(_shard(d), _shift_last_past_end)),
    ("offsets-overlap", "SHARD", lambda d: edit_header(_shard(d), _overlap)),
    ("unknown-dtype", "SHARD", lambda d: edit_header(_shard(d), lambda h: h[first_tensor(h)].update(dtype="Q7"))),
    ("shape-vs-offsets", "SHARD", lambda d: edit_header(_shard(d), lambda h: h[first_tensor(h)].update(
        shape=[s * 2 for s in h[first_tensor(h)]["shape"]]))),
    ("dtype-int-vs-config", "SHARD", lambda d: _retype(_shard(d), "weight", lambda t: t.to(torch.int32))),
    ("shape-vs-config", "SHARD", lambda d: _retype(_shard(d), "proj.weight", lambda t: t[:-16].contiguous())),
    ("nan-weight", "SHARD", lambda d: _retype(_shard(d), "proj.weight", lambda t: t.index_fill(0, torch.tensor([3]),
                                                                                              float("nan")))),
    ("shard-is-a-folder", "SHARD", lambda d: (_shard(d).unlink(), _shard(d).mkdir())),
    ("index-not-json", "model.safetensors.index.json", lambda d: (d / "model.safetensors.index.json").write_text("{oops")),
    ("index-map-a-list", "model.safetensors.index.json",
     lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))),
    ("index-missing-shard", "model.safetensors.index.json", lambda d: _shard(d).unlink()),
    ("index-traversal", "model.safetensors.index.json", lambda d: _index(d, lambda wm: wm.update(
        {k: "../../outside.safetensors" for k in list(wm)[:1]}))),
    ("config-not-json", "config.json", lambda d: (d / "config.json").write_text("model_type: llama")),
    ("config-a-list", "config.json", lambda d: (d / "config.json").write_text("[]")),
    ("config-not-utf8", "config.json", lambda d: (d / "config.json").write_bytes(b"\xff\xfe{\x00")),
    ("config-no-model-type", "config.json", lambda d: _config(d, lambda c: c.pop("model_type"))),
    ("config-no-hidden-size", "config.json", lambda d: _config(d, lambda c: c.pop("hidden_size"))),
    ("config-hidden-size-text", "config.json", lambda d: _config(d, lambda c: c.update(hidden_size="wide"))),
    ("config-zero-heads", "config.json", lambda d: _config(d, lambda c: c.update(num_attention_heads=0))),
    ("config-heads-dont-divide", "config.json", lambda d: _config(d, lambda c: c.update(num_attention_heads=7,
                                                                                           head_dim=None))),
    ("config-transforms-malformed", "config.json", lambda d: _config(d, lambda c: c.update(
        openautoglm={"version": 1, "transforms": "quantize"}))),
    ("config-unknown-transform", "config.json", lambda d: _config(d, lambda c: c.update(
        openautoglm={"version": 1, "transforms": [{"type": "teleport"}]}))),
    ("config-transform-bad-module", "config.json", lambda d: _config(d, lambda c: c.update(openautoglm={
        "version": 1, "transforms": [{"type": "quantize", "config": {"scheme": "w8"}, "modules": ["model.nope"]}]}))),
    ("tokenizer-json-garbage", "tokenizer", lambda d: (d / "tokenizer.json").write_text("{\"version\": 1, \"model\": 7")),
    ("tokenizer-json-binary", "tokenizer", lambda d: (d / "tokenizer.json").write_bytes(bytes(range(256)))),
    ("tokenizer-config-not-json", "tokenizer_config.json", lambda d: (d / "tokenizer_config.json").write_text("{,")),
]


def _index(d: Path, fn) -> None:
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    fn(idx["weight_map"])
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


@pytest.fixture(scope="module")
def sharded(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama saved in 3+ shards with an index (fp32, tokenizer included)."""
    out = tmp_path_factory.mktemp("sharded") / "tiny-sharded"
    hub.save_pretrained(hub.from_pretrained(tiny_llama_dir), out, max_shard_size="4MB")
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


def _needle(kind: str, d: Path) -> str:
    return _shard(d).name if kind == "SHARD" else kind


@pytest.mark.parametrize("cid,kind,damage", CASES, ids=[c[0] for c in CASES])
def test_corrupted_folder(cid, kind, damage, sharded, tmp_path, capsys):
    d = tmp_path / "model"
    shutil.copytree(sharded, d)
    needle = _needle(kind, d)
    damage(d)
    with case("corrupted_files", cid):
        # the API: a clear error naming the file
        tokenizer_case = kind.startswith("tokenizer")
        load = hub.load_tokenizer if tokenizer_case else hub.from_pretrained
        with pytest.raises(Exception) as ei:
            load(d)
        check_clear_error(ei.value) if not isinstance(ei.value, OpenAutoGLMError) else None
        assert isinstance(ei.value, (OpenAutoGLMError, ValueError, TypeError)), f"{type(ei.value).__name__}: {ei.value}"
        assert needle in str(ei.value), f"error does not name {needle}: {ei.value}"
        # the CLI: compress fails with exit 1/2 naming the file, writes nothing
        out = tmp_path / "out"
        code = main(["compress", str(d), "--bits", "8", "--out", str(out)])
        err = capsys.readouterr().err
        assert code in (1, 2) and needle in err.replace("\n", ""), f"exit {code}: {err}"
        assert "Traceback" not in err
        assert not out.exists() and leftovers(tmp_path, {"model"}) == [], leftovers(tmp_path, {"model"})
        if not tokenizer_case and cid != "nan-weight":  # info reads headers only (never the values): it must
            # fail too, naming the file
            code = main(["info", str(d)])
            err = capsys.readouterr().err
            assert code in (1, 2) and needle in err.replace("\n", ""), f"info exit {code}: {err}"


def test_quantized_checkpoint_without_scales(tiny_llama_dir, tmp_path, capsys):
    """A w8a8 checkpoint whose per-channel scales were stripped: refused, naming the missing tensors."""
    from safetensors.torch import load_file, save_file

    from openautoglm import DynamicQuantizer

    with case("corrupted_files", "quantized-no-scales"):
        m = hub.from_pretrained(tiny_llama_dir)
        DynamicQuantizer.quantize(m, bits=8)
        q = m.save_pretrained(tmp_path / "q")
        for f in q.glob("*.safetensors"):
            sd = load_file(f)
            save_file({k: v for k, v in sd.items() if not k.endswith(".scale")}, f, metadata={"format": "pt"})
        with pytest.raises(OpenAutoGLMError, match=r"lacks tensors.*\.scale"):
            hub.from_pretrained(q)
        code = main(["eval", str(q), "--max-tokens", "64", "--seq-len", "32"])
        err = capsys.readouterr().err
        assert code == 1 and "scale" in err and str(q) in err.replace("\n", "")


def test_corrupted_training_checkpoint(tmp_path):
    """A truncated training checkpoint: resume refuses it naming the file (it does not start over silently)."""
    from conftest import make_tiny_llama

    from openautoglm.training.loop import TrainConfig, train

    with case("corrupted_files", "train-checkpoint-truncated"):
        ids = torch.randint(2, 8192, (2048,), generator=torch.Generator().manual_seed(0))
        cfg = TrainConfig(steps=2, micro_batch=1, seq_len=16, amp="none", progress=False, out_dir=str(tmp_path / "run"))
        train(make_tiny_llama(), ids, cfg)
        f = tmp_path / "run" / "checkpoint" / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        with pytest.raises(OpenAutoGLMError, match="optimizer.safetensors"):
            train(make_tiny_llama(), ids, TrainConfig(**{**cfg.to_dict(), "steps": 3}))
