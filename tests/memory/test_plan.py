"""The training planner never exceeds the budget and names the smallest feasible one when nothing fits."""

from __future__ import annotations

import pytest
from conftest import TINY_LLAMA

from openautoglm.cli import main
from openautoglm.memory.plan import NoFeasiblePlan, plan_training
from openautoglm.memory.shapes import model_shape

CFG = {"model_type": "llama", **TINY_LLAMA}


@pytest.fixture(scope="module")
def shape():
    return model_shape(CFG)


@pytest.mark.parametrize("mib", [12, 20, 40, 80, 200, 1000])
def test_plan_never_over_budget(shape, mib):
    budget = mib * 2**20
    try:
        p = plan_training(shape, budget=budget, global_batch=16, seq_len=512)
    except NoFeasiblePlan as e:
        assert e.min_budget > budget
        return
    assert p.peak_bytes <= budget
    assert p.micro_batch * p.grad_accum == 16
    cfg = p.train_config(steps=3)
    assert (cfg.micro_batch, cfg.grad_accum, cfg.amp, cfg.optimizer) == (p.micro_batch, p.grad_accum, p.amp, p.optimizer)
    assert any("chosen" in line for line in p.explanation)


def test_big_budget_prefers_adamw_bf16_without_checkpointing(shape):
    p = plan_training(shape, budget="100GiB", global_batch=8, seq_len=256)
    assert (p.amp, p.optimizer, p.grad_checkpointing, p.micro_batch) == ("bf16", "adamw_fused", False, 8)


def test_nothing_fits_names_smallest_budget(shape):
    with pytest.raises(NoFeasiblePlan, match="smallest feasible budget") as ei:
        plan_training(shape, budget="1MiB", global_batch=8, seq_len=512)
    p = plan_training(shape, budget=ei.value.min_budget, global_batch=8, seq_len=512)
    assert p.peak_bytes <= ei.value.min_budget


def test_bad_inputs():
    with pytest.raises(ValueError, match="size"):
        plan_training(CFG, budget="lots")
    with pytest.raises(ValueError, match="global_batch"):
        plan_training(CFG, global_batch=0)


def test_cli_estimate_and_plan(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    import json

    cfg.write_text(json.dumps(CFG))
    assert main(["estimate", str(cfg), "--mode", "train", "--batch", "2", "--seq", "128", "--amp", "bf16", "--ckpt",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["total"] > 0
    assert main(["plan-train", str(cfg), "--budget", "1GiB", "--global-batch", "8", "--seq", "256"]) == 0
    assert main(["plan-train", str(cfg), "--budget", "1MiB"]) == 2
    assert "smallest feasible budget" in capsys.readouterr().err
    assert main(["estimate", str(cfg), "--mode", "serve"]) == 2


def test_cli_train_resumable(tiny_llama_dir, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 200)
    args = ["train", str(tiny_llama_dir), "--text", str(text), "--out", str(tmp_path / "run"), "--steps", "2",
            "--global-batch", "2", "--seq", "32", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_cli_memory_commands_bad_files(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{bad")
    assert main(["estimate", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["plan-train", str(tmp_path / "missing.json"), "--budget", "1GiB"]) == 2
    assert main(["train", str(tiny_llama_dir), "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["plan-train", str(tiny_llama_dir), "--budget", "lots"]) == 2
    assert "cannot read the size 'lots'" in capsys.readouterr().err
