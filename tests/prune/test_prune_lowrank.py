"""Low-rank: SVD error falls with rank, activation-aware beats plain on the output error, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import hub
from openautoglm.prune import LowRankConfig, LowRankLinear, low_rank
from openautoglm.prune.lowrank import low_rank_factors, rank_for_energy, singular_values, whitening_factor


def _data(seed=0, out_f=48, in_f=64, n=400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) * torch.logspace(0, -2, in_f, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ mix.T  # correlated, anisotropic inputs
    return w, x


def test_svd_error_falls_with_rank():
    w, x = _data()
    L = whitening_factor(x.T @ x, damp=1e-6)
    plain = [float((w - torch.matmul(*low_rank_factors(w, r))).norm()) for r in (4, 8, 16, 32, 48)]
    aware = [float(((w - torch.matmul(*low_rank_factors(w, r, L))) @ x.T).norm()) for r in (4, 8, 16, 32, 48)]
    assert all(a > b for a, b in zip(plain, plain[1:])) and plain[-1] < 1e-9 * float(w.norm())
    assert all(a > b for a, b in zip(aware, aware[1:]))


def test_activation_aware_beats_plain_on_outputs():
    w, x = _data(1)
    L = whitening_factor(x.T @ x, damp=1e-6)
    for r in (4, 8, 16):
        e_plain = ((w - torch.matmul(*low_rank_factors(w, r))) @ x.T).norm()
        e_aware = ((w - torch.matmul(*low_rank_factors(w, r, L))) @ x.T).norm()
        assert e_aware < 0.9 * e_plain


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1 and rank_for_energy(s, 0.9) == 2 and rank_for_energy(s, 1.0) == 3
    w, _ = _data()
    assert singular_values(w).shape == (48,)


@pytest.mark.parametrize("method", ["activation", "plain"])
def test_low_rank_model_round_trip(method, tmp_path, tokenizer, input_ids):
    model = make_tiny_llama()
    res = low_rank(model, tokenizer=tokenizer, param_ratio=0.5, method=method, n_samples=2, seq_len=32,
                   targets=["*.mlp.*"], progress=False)
    assert len(res.ranks) == 12 and res.params_after < res.params_before
    assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    model.save_pretrained(tmp_path / "lr", tokenizer=tokenizer)
    loaded = hub.from_pretrained(tmp_path / "lr")
    assert loaded.model.layers[2].mlp.down_proj.rank == res.ranks["model.layers.2.mlp.down_proj"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_low_rank_only_where_it_saves_memory():
    model = make_tiny_llama()
    res = low_rank(model, energy=1.0, method="plain", targets=["*.self_attn.q_proj"])
    assert not res.ranks and len(res.skipped) == 4
    assert res.params_after == res.params_before


@pytest.mark.parametrize("kwargs, match", [
    (dict(energy=0.0), "energy"), (dict(energy=1.5), "energy"), (dict(param_ratio=1.0), "param_ratio"),
    (dict(energy=0.5, param_ratio=0.5), "exactly one"), (dict(method="svd"), "method"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankConfig(**kwargs)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank=0"):
        low_rank_factors(torch.randn(4, 4), 0)
