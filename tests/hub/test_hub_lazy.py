"""Lazy loading (hub/reader.py, hub/lazy.py): tensors read one at a time, straight into the meta-built model."""

from __future__ import annotations

import pytest
import torch

from openautoglm import hub
from openautoglm.errors import CheckpointError
from openautoglm.hub import CheckpointReader, weight_files


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lazy_load_reads_no_state_dict(tiny_llama_dir, input_ids, monkeypatch):
    """The loader goes through safe_open one tensor at a time, never safetensors' whole-file load_file."""
    import safetensors.torch
    from conftest import make_tiny_llama

    def refuse(*a, **k):
        raise AssertionError("the whole file was read at once")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    m = hub.from_pretrained(tiny_llama_dir, dtype="bf16")
    assert not any(p.is_meta for p in m.parameters()) and next(m.parameters()).dtype == torch.bfloat16
    ref = make_tiny_llama().state_dict()
    for k, v in m.state_dict().items():  # each tensor cast to bf16 exactly as the float model's would be
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k
    torch.testing.assert_close(_logits(m.float(), input_ids), _logits(make_tiny_llama(), input_ids), atol=0.05, rtol=0)


def test_compressed_checkpoint_loads_packed_tensors_directly(tiny_llama_dir, tmp_path):
    from openautoglm.quant import QuantConfig, quantize

    m = hub.from_pretrained(tiny_llama_dir)
    quantize(m, QuantConfig(scheme="w4", group_size=32))
    m.save_pretrained(tmp_path / "q")
    loaded = hub.from_pretrained(tmp_path / "q")
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_packed_tensor_of_wrong_dtype_is_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from openautoglm.quant import QuantConfig, quantize

    m = hub.from_pretrained(tiny_llama_dir)
    quantize(m, QuantConfig(scheme="w8"))
    out = m.save_pretrained(tmp_path / "q")
    sd = load_file(out / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.qweight"] = sd["model.layers.1.mlp.up_proj.qweight"].float()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.qweight.*model\.safetensors.*dtype"):
        hub.from_pretrained(out)


def test_prefetch_stream_equals_plain_reads(tmp_path, tiny_llama_dir):
    """The read-ahead pipeline (CUDA's default) cuts tensors into pieces; run it on the CPU with tiny pieces."""
    from openautoglm.quant import QuantConfig, quantize

    m = hub.from_pretrained(tiny_llama_dir)
    quantize(m, QuantConfig(scheme="w8a8"))
    out = m.save_pretrained(tmp_path / "q", max_shard_size="200KB")
    reader = CheckpointReader(weight_files(out))
    names = reader.keys()
    ref = {n: reader.get(n).clone() for n in names}
    got = dict(reader.stream(names, torch.device("cpu"), prefetch=True, slot_bytes=4096))
    assert got.keys() == ref.keys()
    for n in names:
        assert got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]), n
    early = reader.stream(names, torch.device("cpu"), prefetch=True, slot_bytes=1000)
    next(early)
    early.close()  # workers joined, nothing left running


def test_reader_bounds_mapped_pages(tmp_path):
    """Pages of a mapped shard stay resident while it is mapped: the reader re-maps after remap_bytes."""
    from safetensors.torch import save_file

    f = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.full((1024, 1024), float(i)) for i in range(24)}, f)  # 96 MiB

    def rss_file() -> int:
        return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("RssFile"))

    reader = CheckpointReader([f], remap_bytes=8 << 20)
    start, peak = rss_file(), 0
    for name in reader.keys():
        t = reader.get(name)
        assert float(t[0, 0]) == float(name[1:])
        del t
        peak = max(peak, rss_file() - start)
    assert peak < 40 << 20, f"mapped pages grew by {peak >> 20} MiB for a 96 MiB shard"
