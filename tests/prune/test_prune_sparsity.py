"""Sparsity: masks (unstructured, 2:4), Wanda scores, save/load, recovery keeps zeros, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import hub
from openautoglm.prune import SparsityConfig, check_nm, nm_mask, recover, sparsify, weight_scores
from openautoglm.prune.sparsity import sparse_storage_bytes, unstructured_mask


def test_nm_mask_keeps_the_two_largest_of_four():
    s = torch.rand(16, 32, generator=torch.Generator().manual_seed(0))
    m = nm_mask(s, 2, 4)
    assert m.reshape(16, 8, 4).sum(-1).eq(2).all()
    kept_min = torch.where(m, s, torch.inf).reshape(16, 8, 4).min(-1).values
    dropped_max = torch.where(~m, s, -torch.inf).reshape(16, 8, 4).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_unstructured_mask_per_output_and_per_layer():
    s = torch.rand(8, 20, generator=torch.Generator().manual_seed(1))
    assert unstructured_mask(s, 0.25, per_output=True).sum(1).eq(15).all()
    m = unstructured_mask(s, 0.25, per_output=False)
    assert int((~m).sum()) == 40 and s[~m].max() <= s[m].min()


def test_wanda_score_is_weight_times_input_norm():
    w = torch.randn(4, 6)
    x = torch.randn(50, 6) * torch.arange(1, 7)
    score = weight_scores(w, "wanda", in_sq_norm=x.pow(2).sum(0))
    assert torch.allclose(score, w.abs() * x.norm(dim=0), rtol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_pattern_is_valid(method, tokenizer, input_ids):
    model = make_tiny_llama()
    res = sparsify(model, tokenizer=tokenizer, method=method, pattern="2:4", n_samples=2, seq_len=32, progress=False)
    assert res.params_pruned * 2 == res.params_targeted
    for name, mod in model.named_modules():
        if name.endswith(("_proj",)) and "layers" in name:
            assert check_nm(mod.weight, 2, 4), name
    assert not check_nm(torch.ones(2, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids).logits).all()


@pytest.mark.parametrize("scope", ["per_output", "per_layer", "global"])
def test_unstructured_sparsity_fraction(scope, tokenizer):
    model = make_tiny_llama()
    res = sparsify(model, tokenizer=tokenizer, sparsity=0.5, method="magnitude", scope=scope, progress=False)
    assert res.params_pruned / res.params_targeted == pytest.approx(0.5, abs=1e-3)
    if scope != "global":
        assert all(v == pytest.approx(0.5, abs=0.01) for v in res.per_module.values())
    assert model.lm_head.weight.ne(0).all()  # not a target


def test_gradient_methods_and_round_trip(tmp_path, tokenizer, input_ids):
    model = make_tiny_llama()
    sparsify(model, tokenizer=tokenizer, sparsity=0.3, method="fisher", n_samples=2, seq_len=32, progress=False)
    assert all(p.grad is None for p in model.parameters())
    model.save_pretrained(tmp_path / "sparse", tokenizer=tokenizer)
    loaded = hub.from_pretrained(tmp_path / "sparse")
    assert hub.applied_transforms(loaded)[-1]["config"]["method"] == "fisher"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_recovery_keeps_pruned_weights_zero():
    model = make_tiny_llama()
    sparsify(model, sparsity=0.5, method="magnitude")
    zeros = model.model.layers[0].mlp.up_proj.weight.eq(0)
    ids = torch.randint(2, 8192, (4000,), generator=torch.Generator().manual_seed(3))
    res = recover(model, ids, steps=2, batch_size=2, seq_len=32, lr=1e-3, warmup=0, progress=False)
    assert len(res.losses) == 2
    w = model.model.layers[0].mlp.up_proj.weight
    assert w[zeros].eq(0).all() and w[~zeros].ne(0).all()


def test_storage_bytes():
    w = torch.zeros(4, 8, dtype=torch.float16)
    w[:, :2] = 1.0
    b = sparse_storage_bytes(w, "2:4")
    assert b["dense"] == 64 and b["csr"] == 8 * 6 + 20 and b["bitmask"] == 16 + 4
    assert b["semi_structured_2:4"] == 36  # 9/16 of dense


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.2), "sparsity"), (dict(sparsity=0.0), "sparsity"), (dict(pattern="3:2"), "pattern"),
    (dict(pattern="blocks"), "pattern"), (dict(method="random"), "method"), (dict(scope="row"), "scope"),
    (dict(pattern="2:4", scope="global"), "N:M"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(4, 6))
    model = make_tiny_llama(intermediate_size=258)
    with pytest.raises(ValueError, match=r"mlp.down_proj has 258"):
        sparsify(model, pattern="2:4", method="magnitude")
    with pytest.raises(ValueError, match="no Linear module matches"):
        sparsify(make_tiny_llama(), method="magnitude", targets=["*.nothing"])
    with pytest.raises(ValueError, match="training data"):
        recover(make_tiny_llama())
    with pytest.raises(ValueError, match="recovery method"):
        recover(make_tiny_llama(), torch.arange(1000), method="adapter")
