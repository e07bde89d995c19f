"""Pruning options on the command line (``compress`` if present, else ``prune``) and the recipe API."""

from __future__ import annotations

import pytest
import torch

import openautoglm.cli.prune  # noqa: F401 - registers the `prune` command
from openautoglm import _hf, hub
from openautoglm.cli import main
from openautoglm.prune import PruneRecipe, check_nm


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prune_command_all_steps_round_trip(tiny_llama_dir, tmp_path, capsys, input_ids):
    out_dir = tmp_path / "pruned"
    code, out, err = run(["prune", str(tiny_llama_dir), "--prune-heads", "0.25", "--sparsity-pattern", "2:4",
                          "--sparsity-method", "magnitude", "--low-rank", "0.5", "--calib-samples", "4",
                          "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "pruning" in out and "parameters" in out
    m = hub.from_pretrained(out_dir)
    kinds = [t["type"] for t in hub.applied_transforms(m)]
    assert kinds == ["prune_heads", "low_rank", "sparsity"]
    assert sum(len(_hf.attention_layout(a)) for _, a in _hf.attention_modules(m)) == 24
    assert check_nm(m.model.layers[0].mlp.gate_proj.down.weight if hasattr(m.model.layers[0].mlp.gate_proj, "down")
                    else m.model.layers[0].mlp.gate_proj.weight)
    with torch.no_grad():
        assert torch.isfinite(m(input_ids).logits).all()


@pytest.mark.parametrize("args, needle", [
    (["--prune-heads", "1.5"], "prune_heads=1.5"), (["--sparsity", "0.5", "--sparsity-method", "random"], "sparsity-method"),
    (["--sparsity-pattern", "3:4"], "sparsity-pattern"), (["--low-rank", "0"], "low_rank=0"), ([], "nothing to do"),
])
def test_bad_options_exit_2(args, needle, tiny_llama_dir, tmp_path, capsys):
    code, out, err = run(["prune", str(tiny_llama_dir), "--out", str(tmp_path / "x"), *args], capsys)
    assert code == 2 and needle in err, err


def test_recipe_validates_early():
    with pytest.raises(ValueError, match="sparsity"):
        PruneRecipe(sparsity=2.0)
    assert PruneRecipe().empty and not PruneRecipe(sparsity_pattern="2:4").empty


def test_compress_prunes_before_quantizing(tiny_llama_dir, tmp_path, capsys, input_ids):
    pytest.importorskip("openautoglm.cli.compress")
    out_dir = tmp_path / "c"
    code, out, err = run(["compress", str(tiny_llama_dir), "--prune-heads", "0.25", "--sparsity", "0.5",
                          "--sparsity-method", "magnitude", "--low-rank", "0.8", "--bits", "8", "--calib-samples", "4",
                          "--out", str(out_dir)],
                         capsys)
    assert code == 0, err
    m = hub.from_pretrained(out_dir)
    kinds = [t["type"] for t in hub.applied_transforms(m)]
    assert kinds[:3] == ["prune_heads", "low_rank", "sparsity"] and len(kinds) == 4
    assert sum(len(_hf.attention_layout(a)) for _, a in _hf.attention_modules(m)) == 24
    with torch.no_grad():
        assert torch.isfinite(m(input_ids).logits).all()


def test_compress_rejects_bad_pruning_option(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("openautoglm.cli.compress")
    code, out, err = run(["compress", str(tiny_llama_dir), "--sparsity-pattern", "2:8", "--out", str(tmp_path / "x")],
                         capsys)
    assert code == 2 and "sparsity-pattern" in err
