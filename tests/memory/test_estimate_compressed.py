"""The estimator honours compressed checkpoints: quantized weights and pruned heads, read from config.json."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import hub
from openautoglm.memory import estimate_memory, model_bytes


def test_quantized_checkpoint_weights_exact(tmp_path, tokenizer):
    quant = pytest.importorskip("openautoglm.quant.api")
    model = make_tiny_llama(0, torch.bfloat16)
    quant.DynamicQuantizer.quantize(model, bits=4)
    expected = model_bytes(model)
    assert estimate_memory(model, mode="inference").terms["weights"] == expected
    hub.save_pretrained(model, tmp_path / "q4", tokenizer=tokenizer)
    est = estimate_memory(tmp_path / "q4", mode="inference", dtype="bf16")  # from config.json: meta device
    assert abs(est.terms["weights"] - expected) <= 64  # rotary buffers: shared storage vs meta tensors
    with pytest.raises(ValueError, match="quantized"):
        estimate_memory(tmp_path / "q4", mode="train")


def test_pruned_heads_shrink_kv_cache_and_activations(tmp_path, tokenizer):
    heads = pytest.importorskip("openautoglm.prune.heads")
    model = make_tiny_llama(0, torch.bfloat16)
    before = estimate_memory(model, mode="inference", seq_len=1024)
    # drop query heads 0-3 of layer 1: their KV head (GQA group of 4) goes too
    heads.remove_heads(model, {1: [0, 1, 2, 3]})
    hub.save_pretrained(model, tmp_path / "pruned", tokenizer=tokenizer)
    after = estimate_memory(tmp_path / "pruned", mode="inference", seq_len=1024, dtype="bf16")
    per_layer_kv = before.terms["kv_cache"] // 4
    assert after.terms["kv_cache"] == before.terms["kv_cache"] - per_layer_kv // 2
    assert abs(after.terms["weights"] - model_bytes(model)) <= 64  # rotary buffers: shared storage vs meta
