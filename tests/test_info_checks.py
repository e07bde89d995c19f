"""`openautoglm info` checks the safetensors headers (issue 14, defect 2): a truncated shard, an absurd header
length, an index that disagrees with its shards or tensors that do not match config.json fail with exit 1 and
a message naming the file; nothing is printed as if the folder were fine."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
from conftest import make_tiny_llama

from openautoglm import hub
from openautoglm.cli import main
from openautoglm.errors import CheckpointError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("sharded") / "m"
    hub.save_pretrained(make_tiny_llama(), out, tokenizer=tokenizer, max_shard_size="2MB")
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst, sorted(dst.glob("*.safetensors"))


def _info(path, capsys):
    code = main(["info", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_reports_checked_files(sharded, capsys):
    code, out, err = _info(sharded, capsys)
    n = len(list(sharded.glob("*.safetensors")))
    assert code == 0 and f"{n} safetensors" in out and "headers checked" in out


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])


def _absurd_header(f):
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    f.write_bytes(bytes(data))


def _header_past_limit(f):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    pad = 100_000_001 - n  # a header longer than safetensors' 100 MB limit (sparse: the file is not written densely)
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", n + pad))


def _not_json(f):
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe[["
    f.write_bytes(bytes(data))


def _offsets_past_end(f):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 10**9, e + 10**9]
    raw = json.dumps(header).encode().ljust(n)
    f.write_bytes(data[:8] + raw[:n] + data[8 + n:] if len(raw) == n else struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("corrupt,message", [
    (_truncate, "truncated"),
    (_absurd_header, "header length 4611686018427387904 exceeds the file size"),
    (_not_json, "corrupt or truncated safetensors file"),
    (_offsets_past_end, "does not fill its data_offsets|expected"),
])
def test_info_fails_on_a_corrupt_shard(sharded, tmp_path, capsys, corrupt, message):
    path, files = _copy(sharded, tmp_path)
    corrupt(files[1])
    code, out, err = _info(path, capsys)
    assert code == 1, out
    assert files[1].name in err and "CheckpointError" in err
    assert re.search(message, err)
    assert "parameters" not in out  # no tables printed as if it were fine


def test_header_length_over_the_limit(sharded, tmp_path):
    path, files = _copy(sharded, tmp_path)
    with open(files[0], "r+b") as fh:  # grow the file so the length is within it, but over 100 MB
        fh.truncate(100_000_100)
    _header_past_limit(files[0])
    with pytest.raises(CheckpointError, match="exceeds the 100000000-byte limit"):
        hub.validate_safetensors(files[0])


def test_info_fails_when_index_and_shards_disagree(sharded, tmp_path, capsys):
    path, files = _copy(sharded, tmp_path)
    index = path / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    shards = list(meta["weight_map"].values())
    name, shard = next((k, v) for k, v in meta["weight_map"].items() if shards.count(v) > 1)
    other = next(f.name for f in files if f.name != shard)
    meta["weight_map"][name] = other
    index.write_text(json.dumps(meta))
    code, out, err = _info(path, capsys)
    assert code == 1 and f"says tensor {name!r} is in {other}, but it is in {shard}" in err


def test_info_fails_on_a_missing_shard_or_tensor(sharded, tmp_path, capsys):
    path, files = _copy(sharded, tmp_path)
    files[0].unlink()
    code, out, err = _info(path, capsys)
    assert code == 1 and "missing" in err and files[0].name in err
    # a single-file checkpoint of another (smaller) config: tensors the model needs are absent / wrong shape
    other, _ = _copy(sharded, tmp_path / "b")
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (other / "config.json").write_text(json.dumps(cfg))
    code, out, err = _info(other, capsys)
    assert code == 1 and "lacks tensors the model needs: model.layers.4." in err
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 4, 512
    (other / "config.json").write_text(json.dumps(cfg))
    code, out, err = _info(other, capsys)
    assert code == 1 and "does not match its config.json" in err and "[512, 128]" in err


def test_info_on_a_config_only_folder_says_so(tmp_path, capsys, caplog, sharded):
    (tmp_path / "c").mkdir()
    shutil.copy(sharded / "config.json", tmp_path / "c" / "config.json")
    code, out, err = _info(tmp_path / "c", capsys)
    assert code == 0 and "weight files" in out and "no weight files" in caplog.text
