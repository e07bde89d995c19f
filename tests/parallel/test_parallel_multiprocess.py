"""Tensor parallelism across real processes (gloo on the CPU), launched with torchrun from pytest.

One 4-rank launch runs every model check of ``_tp_worker.py`` (4-way, and 2-way through a (2, 2) device mesh)
and the CLI's ``eval --tp 4``; one 2-rank launch runs ``python -m openautoglm generate ... --tp 2`` as a user
would. Start-up dominates, so the checks share those two launches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openautoglm.cli import main

WORKER = Path(__file__).with_name("_tp_worker.py")
FP32_TOL = 1e-5  # fp32 logits: the sum over ranks only reorders additions


def torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def results(tiny_llama_dir, tmp_path_factory, tokenizer):
    from conftest import make_tiny_llama

    from openautoglm import hub
    from openautoglm.quant.api import quantize
    from openautoglm.quant.config import QuantConfig

    out = tmp_path_factory.mktemp("tp4")
    m = make_tiny_llama()
    quantize(m, QuantConfig(scheme="w4", group_size=32))
    hub.save_pretrained(m, out / "tiny-w4", tokenizer=tokenizer)
    p = torchrun(4, str(WORKER), "--out", str(out), "--tiny", str(tiny_llama_dir), "--tiny-w4", str(out / "tiny-w4"))
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = json.loads((out / "results.json").read_text())
    assert len(ranks) == 4
    return ranks


def _get(results, name):
    for r, res in enumerate(results):
        assert "exception" not in res[name], f"rank {r}: {res[name]['traceback']}"
    return [res[name] for res in results]


@pytest.mark.parametrize("tp", [4, 2])
@pytest.mark.parametrize("scheme", ["float", "w8", "w4"])
def test_sharded_logits_equal_single_process(results, scheme, tp):
    for r in _get(results, f"logits_{scheme}_tp{tp}"):
        assert r["max_abs"] <= FP32_TOL * max(1.0, r["ref_max"]) and r["argmax_equal"], r


def test_w8a8_row_parallel_is_close_and_no_worse(results):
    """Row-parallel w8a8 quantizes each rank's activation slice with its own scale: not bitwise, as accurate."""
    for r in _get(results, "logits_w8a8_tp4"):
        assert r["cos"] > 0.9999 and r["sharded_err"] <= 1.2 * r["single_err"], r


@pytest.mark.parametrize("scheme", ["float", "w4"])
def test_each_rank_holds_a_quarter_and_the_estimator_agrees(results, scheme):
    """GQA with 2 KV heads on 4 ranks: each rank holds 1/4 of the cut tensors except the replicated KV projections."""
    for r in _get(results, f"bytes_{scheme}"):
        assert 0.25 <= r["sharded_part_ratio"] < 0.26, r  # k/v: 1 of 2 heads (1/2), everything else 1/4
        assert r["measured"] == r["planned"] == r["estimate_weights"], r  # tp_degree=4 is what a rank holds
        assert r["measured"] < 0.26 * r["full"], r
        assert r["kv_measured"] == r["kv_estimate"], r  # one (replicated) KV head per rank


def test_quantized_kv_cache_per_rank(results):
    for r in _get(results, "kv_cache"):
        assert r["tokens_equal"] and r["new_tokens"] == 24 and r["kv_bytes_ratio"] == 0.5, r


@pytest.mark.parametrize("kind", ["float", "w4"])
def test_sharded_loading_reads_only_its_slices(results, kind):
    for r in _get(results, f"load_{kind}"):
        assert r["max_abs"] <= FP32_TOL * max(1.0, r["ref_max"]), r
        assert r["bytes_read"] < 0.26 * r["checkpoint_bytes"] and r["measured"] < 0.26 * r["full"], r


def test_pruned_uneven_low_rank_and_functional_collectives(results):
    for name in ("pruned_uneven", "low_rank", "functional"):
        for r in _get(results, name):
            assert r["max_abs"] <= FP32_TOL * max(1.0, r["ref_max"]), (name, r)
    assert [r["q_heads"][0] for r in _get(results, "pruned_uneven")] == [2, 2, 1, 2]  # 7 heads: cuts 2, 4, 5


def test_biases_and_replicated_vocabulary(results):
    for r in _get(results, "bias"):
        for c in (r, r["replicate"]):
            assert c["max_abs"] <= FP32_TOL * max(1.0, c["ref_max"]), r
        assert r["replicate"]["embedding_rows"] == 8192


def test_world_size_not_dividing_heads_is_a_clear_error(results):
    for r in _get(results, "error"):
        assert r["error"] and "tp_size=4 does not divide its 6 query heads" in r["error"], r


def test_eval_cli_under_torchrun(results):
    ranks = _get(results, "cli_eval")
    assert all(r["code"] == 0 for r in ranks)
    assert abs(ranks[0]["ppl"] - ranks[0]["ref_ppl"]) <= 1e-5 * ranks[0]["ref_ppl"]
    assert "perplexity" in ranks[0]["stdout"] and all(r["stdout"] == "" for r in ranks[1:])


def test_generate_cli_torchrun_tp2_equals_single_process(capsys):
    argv = ["generate", "open-autoglm-base", "The standard library", "--max-new-tokens", "24", "--dtype", "fp32"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    p = torchrun(2, "-m", "openautoglm", "-q", *argv, "--tp", "2")
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout == want  # rank 0 prints the same text; rank 1 prints nothing
    assert len(want.split()) > 5
