"""Exhaustion: the disk fills up in the middle of a file (a writer that raises ENOSPC halfway, and the kernel's
RLIMIT_FSIZE in a subprocess) and memory runs out while loading (RLIMIT_AS in a subprocess). Each gives a clear
error, the previous output and checkpoint stay byte for byte, and nothing partial is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openautoglm import hub
from openautoglm.cli import main
from openautoglm.errors import DiskFullError

from ._support import assert_intact, case, leftovers, snapshot

pytestmark = pytest.mark.timeout(600)
BUNDLED = Path(__file__).resolve().parents[2] / "src" / "openautoglm" / "models" / "open-autoglm-base"


def _enospc_halfway(monkeypatch, *, after: int = 0):
    """Make every safetensors write put half its bytes on disk and then fail with ENOSPC (after ``after`` good
    writes)."""
    import safetensors.torch as st
    import transformers.modeling_utils as mu

    calls = {"n": 0}

    def wrap(real):
        def fn(obj, filename, *a, **k):
            calls["n"] += 1
            out = real(obj, filename, *a, **k)
            if calls["n"] > after:
                os.truncate(filename, os.path.getsize(filename) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
            return out
        return fn

    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):  # the streaming writer (compress) writes tensors at their offsets
        calls["n"] += 1
        if calls["n"] > after:
            real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(mu, "safe_save_file", wrap(mu.safe_save_file))
    monkeypatch.setattr(st, "save_file", wrap(st.save_file))  # safetensors' save_model writes through it


def test_disk_full_mid_file_keeps_previous_output(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    m = hub.from_pretrained(tiny_llama_dir)
    hub.save_pretrained(m, out)
    before = snapshot(out)
    _enospc_halfway(monkeypatch)
    with case("exhaustion", "ENOSPC: save_pretrained over a model"):
        with pytest.raises(DiskFullError, match="No space left.*unchanged"):
            hub.save_pretrained(m, out, overwrite=True)
        assert_intact(out, before, "disk full during save_pretrained")
        assert leftovers(tmp_path, {"out"}) == []
    with case("exhaustion", "ENOSPC: save_pretrained, first write"):
        with pytest.raises(DiskFullError, match="nothing was written"):
            hub.save_pretrained(m, tmp_path / "fresh")
        assert leftovers(tmp_path, {"out"}) == []
    with case("exhaustion", "ENOSPC: compress --overwrite"):
        code = main(["compress", str(tiny_llama_dir), "--bits", "8", "--out", str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 1 and "No space left" in err and "Traceback" not in err, err
        assert_intact(out, before, "disk full during compress")
        assert leftovers(tmp_path, {"out"}) == []


def test_disk_full_during_training_checkpoint(tmp_path, monkeypatch):
    from openautoglm.training import checkpoints as io
    from openautoglm.training.loop import TrainConfig, train

    from .test_bad_input_api import tiny as make_tiny_llama

    ids = torch.randint(2, 512, (4096,), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    cfg = TrainConfig(steps=4, micro_batch=1, seq_len=16, amp="none", progress=False, save_every=2, out_dir=str(run))
    ref = train(make_tiny_llama(), ids, TrainConfig(**{**cfg.to_dict(), "out_dir": str(tmp_path / "ref")}))
    with case("exhaustion", "ENOSPC: training checkpoint"):
        with monkeypatch.context() as mp:
            _enospc_halfway(mp, after=3)  # the step-2 checkpoint (model, optimizer, rng) is written, step 4 is not
            with pytest.raises(DiskFullError, match="checkpoint"):
                train(make_tiny_llama(), ids, cfg)
        assert json.loads((run / "checkpoint" / "trainer.json").read_text())["step"] == 2
        for f in ("model.safetensors", "optimizer.safetensors"):
            hub.validate_safetensors(run / "checkpoint" / f)
        assert leftovers(run, {io.CKPT}) == []
        res = train(make_tiny_llama(), ids, cfg)  # space is back: resumes and ends where an uninterrupted run does
        assert res.resumed_from == 2 and res.losses == ref.losses


def test_kernel_limits_file_size_and_address_space(tiny_llama_dir, tmp_path):
    """Real kernel limits in forked children (one subprocess): RLIMIT_FSIZE during compress and during a training
    checkpoint, RLIMIT_AS while eval and compress load the bundled model."""

    out = tmp_path / "out"
    assert main(["compress", str(tiny_llama_dir), "--bits", "8", "--out", str(out)]) == 0
    before = snapshot(out)
    (tmp_path / "train.txt").write_text(BUNDLED.joinpath("tokenizer.json").read_text()[:40000])
    run = tmp_path / "run"
    targs = ["train", str(tiny_llama_dir), "--text", str(tmp_path / "train.txt"), "--out", str(run), "--global-batch",
             "1", "--seq", "16", "--amp", "none", "--save-every", "1", "--no-progress", "--device", "cpu"]
    assert main(targs + ["--steps", "1"]) == 0
    ckpt_before = snapshot(run / "checkpoint")
    oom_out = tmp_path / "oom-out"
    scenarios = {
        "fsize-compress": {"argv": ["compress", str(tiny_llama_dir), "--bits", "4", "--out", str(out), "--overwrite"],
                           "limit": "fsize", "value": 256 * 1024},
        "fsize-train": {"argv": targs + ["--steps", "2"], "limit": "fsize", "value": 256 * 1024},
        "as-eval": {"argv": ["eval", str(BUNDLED), "--max-tokens", "64", "--device", "cpu"], "limit": "as",
                    "value": 16 * 2**20},
        "as-compress": {"argv": ["compress", str(BUNDLED), "--bits", "8", "--out", str(oom_out), "--device", "cpu"],
                        "limit": "as", "value": 16 * 2**20},
    }
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"work": str(tmp_path), "scenarios": scenarios, "warm": [str(BUNDLED)]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_exhaust.py")), str(spec),
                           str(tmp_path / "report.json")], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    with case("exhaustion", "RLIMIT_FSIZE: compress --overwrite"):
        r = rep["fsize-compress"]
        assert r["code"] == 1 and "File too large" in r["log"] and "Traceback" not in r["log"], r
        assert_intact(out, before, "file-size limit during compress")
        assert not [n for n in leftovers(tmp_path, set()) if n.startswith(".out.")]
    with case("exhaustion", "RLIMIT_FSIZE: training checkpoint"):
        r = rep["fsize-train"]
        assert r["code"] == 1 and "File too large" in r["log"] and "Traceback" not in r["log"], r
        assert_intact(run / "checkpoint", ckpt_before, "file-size limit during a training checkpoint")
    for name in ("as-eval", "as-compress"):
        with case("exhaustion", f"RLIMIT_AS: {name}"):
            r = rep[name]
            assert r["code"] == 1 and "not enough memory" in r["log"] and "Traceback" not in r["log"], r
    assert not oom_out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".oom-out")]
    assert snapshot(BUNDLED)  # the model read is untouched (read-only use)
