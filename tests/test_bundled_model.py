"""The shipped reference model open-autoglm-base: format, architecture, quality and generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openautoglm import AutoModelForCausalLM, AutoTokenizer, hub
from openautoglm.evaluate import greedy_generate, perplexity

BASE = hub.SHIPPED_MODELS["open-autoglm-base"]
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "model"


@pytest.fixture(scope="module")
def base():
    return AutoModelForCausalLM.from_pretrained("open-autoglm-base", dtype="fp32")


@pytest.fixture(scope="module")
def base_tok():
    return AutoTokenizer.from_pretrained("open-autoglm-base")


def test_shipped_as_bf16_safetensors_shards_under_16mib():
    shards = sorted(BASE.glob("*.safetensors"))
    assert shards and not list(BASE.glob("*.bin"))
    for s in shards:
        assert s.stat().st_size <= 16 * 2**20, s
        header = hub.validate_safetensors(s)
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_architecture_gqa_and_size(base):
    cfg = base.config
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_attention_heads >= 16 and cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.max_position_embeddings >= 2048
    n = sum(p.numel() for p in base.parameters())
    assert 10e6 <= n <= 25e6
    assert 8000 <= cfg.vocab_size <= 16384


def test_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM as HF

    m = HF.from_pretrained(BASE)
    assert type(m).__name__ == "LlamaForCausalLM"


def test_short_heldout_perplexity(base, base_tok):
    res = perplexity(base, base_tok, max_tokens=2048, seq_len=512, progress=False)
    # The full held-out figure is ~15 (benchmarks/results/model/reference.json); a unigram model scores ~900.
    assert res.perplexity < 40, res


def test_generates_documentation_not_loops(base, base_tok):
    out = greedy_generate(base, base_tok, ["The :mod:`json` module"], max_new_tokens=40)[0]
    ids = base_tok(out, add_special_tokens=False).input_ids
    assert len(set(ids)) > len(ids) // 4, f"degenerate loop: {out!r}"
    assert any(w in out for w in ("function", "module", "..", "::")), out


def test_reference_results_meet_the_bar():
    res = json.loads((RESULTS / "reference.json").read_text())
    assert res["heldout_perplexity"] < res["unigram_perplexity"] / 3
    log = json.loads((RESULTS / "training_log.json").read_text())
    assert log["args"]["seq"] == "2048" and log["heldout_ppl"] < res["unigram_perplexity"] / 3


def test_heldout_split_is_by_file():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_corpus", Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py")
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    listed = (BASE.parents[1] / "data" / "heldout_files.txt").read_text().split()
    assert listed
    for entry in listed:
        pkg, rel = entry.split(":", 1)
        assert pkg == "python3.11-doc" and bc.is_heldout("python", rel)
    assert not bc.is_heldout("linux", listed[0].split(":", 1)[1]), "kernel docs are training-only"
