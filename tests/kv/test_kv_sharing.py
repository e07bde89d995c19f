"""CrossLayerKVCache: merge math, pairing, retained tokens, memory freed, composition with INT4, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama
from transformers import DynamicCache

from openautoglm import _hf
from openautoglm.kv import CrossLayerKVCache, KVCacheConfig
from openautoglm.kv.sharing import merge_pair, slerp


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_slerp_endpoints_and_midpoint():
    a = F.normalize(_rand(10, 16, seed=1), dim=-1)
    b = F.normalize(_rand(10, 16, seed=2), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert torch.allclose((mid * a).sum(-1), (mid * b).sum(-1), atol=1e-5)  # equidistant
    assert torch.allclose(mid.norm(dim=-1), torch.ones(10), atol=1e-5)


def test_merge_pair_keeps_norms_and_flags_disagreement():
    xa = _rand(1, 2, 50, 16, seed=3)
    xb = xa * 3 + 0.05 * _rand(1, 2, 50, 16, seed=4)  # same directions, different magnitudes
    xb[:, :, :10] = _rand(1, 2, 10, 16, seed=5)  # 10 tokens that disagree
    shared, na, nb, merged = merge_pair(xa, xb, threshold=0.95)
    assert merged[:, :, 10:].all() and not merged[:, :, :10].any()
    assert torch.allclose(na, xa.norm(dim=-1, keepdim=True)) and torch.allclose(nb, xb.norm(dim=-1, keepdim=True))
    rec_b = shared * nb
    assert F.cosine_similarity(rec_b[:, :, 10:], xb[:, :, 10:], dim=-1).min() > 0.99



def _feed(cache, n_layers, k_list, v_list):
    outs = []
    for i in range(n_layers):
        outs.append(cache.update(k_list[i], v_list[i], i))
    return outs


def _similar_kv(n_layers, n, seed, noise=0.02, disagree=0):
    base_k, base_v = _rand(1, 2, n, 16, seed=seed), _rand(1, 2, n, 16, seed=seed + 1)
    ks, vs = [], []
    for i in range(n_layers):
        k = base_k * (1 + i) + noise * _rand(1, 2, n, 16, seed=seed + 10 + i)
        v = base_v * (2 + i) + noise * _rand(1, 2, n, 16, seed=seed + 50 + i)
        if disagree and i % 2:
            k[:, :, :disagree] = _rand(1, 2, disagree, 16, seed=seed + 90 + i)
        ks.append(k)
        vs.append(v)
    return ks, vs


def test_pairs_share_memory_and_reconstruct():
    n_layers = 4
    cache = CrossLayerKVCache(start_layer=0, threshold=0.9, num_layers=n_layers)
    ks, vs = _similar_kv(n_layers, 64, seed=10, disagree=8)
    _feed(cache, n_layers, ks, vs)  # prefill
    k2, v2 = _similar_kv(n_layers, 1, seed=20)
    outs = _feed(cache, n_layers, k2, v2)  # one decode step reads the shared store
    full = sum((k.numel() + v.numel()) * 4 for k, v in zip(ks, vs)) * 65 / 64
    rep = cache.report()
    assert [p["layers"] for p in rep["pairs"]] == [[0, 1], [2, 3]]
    assert 0.8 < rep["pairs"][0]["shared_fraction_k"] < 0.95  # 8 of 64 tokens retained on layer 1
    assert rep["pairs"][0]["shared_fraction_v"] > 0.99
    assert cache.nbytes() < 0.62 * full
    for i, (k_all, v_all) in enumerate(outs):
        ref_k = torch.cat([ks[i], k2[i]], dim=-2)
        assert F.cosine_similarity(k_all, ref_k, dim=-1).min() > 0.99
        assert torch.equal(k_all[:, :, -1:], k2[i])  # the new token itself is exact
    # the retained (disagreeing) tokens of layer 1 come back exactly
    assert torch.allclose(outs[1][0][:, :, :8], ks[1][:, :, :8])


def test_threshold_one_shares_nothing_and_matches_dynamic_cache():
    model = make_tiny_llama()
    ids = torch.randint(2, 8192, (1, 40), generator=torch.Generator().manual_seed(30))
    with torch.no_grad():
        ref = DynamicCache(config=model.config)
        _hf.forward_with_cache(model, ids[:, :-3], ref)
        a = _hf.forward_with_cache(model, ids[:, -3:], ref).logits
        cache = CrossLayerKVCache(start_layer=1, threshold=1.0, config=model.config)
        _hf.forward_with_cache(model, ids[:, :-3], cache)
        b = _hf.forward_with_cache(model, ids[:, -3:], cache).logits
    assert F.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.9999
    assert all(p["shared_fraction_k"] == 0 and not p["shared"] for p in cache.report()["pairs"])
    # dissimilar pairs fall back to separate stores: no overhead over the plain cache
    assert cache.nbytes() == sum(layer.keys.nbytes + layer.values.nbytes for layer in ref.layers)
    assert set(cache.report()["prefill_similarity"]) == {"0-1", "1-2", "2-3"}


def test_composes_with_int4_and_generates():
    model = make_tiny_llama()
    kv = KVCacheConfig(bits=4, group_size=16, residual_length=16, share=True, share_start=0, share_threshold=-1.0)
    cache = kv.build(model.config)
    ids = torch.randint(2, 8192, (1, 200), generator=torch.Generator().manual_seed(31))
    out = _hf.generate_with_cache(model, ids, cache, max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 205)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        _hf.forward_with_cache(model, out[:, :-1], ref)
    full = sum(layer.keys.untyped_storage().nbytes() * 2 for layer in ref.layers)
    assert cache.nbytes() < full / 4  # everything shared (threshold -1) and 4-bit: > 4x smaller
    assert cache.report()["pairs"][0]["shared_fraction_k"] == 1.0


def test_sharing_errors():
    with pytest.raises(ValueError, match="config"):
        CrossLayerKVCache(start_layer=0)
    with pytest.raises(ValueError, match="start_layer=7"):
        CrossLayerKVCache(start_layer=7, num_layers=4)
    with pytest.raises(ValueError, match="threshold"):
        CrossLayerKVCache(start_layer=0, threshold=1.5, num_layers=4)
    with pytest.raises(ValueError, match="bits=3"):
        CrossLayerKVCache(start_layer=0, num_layers=4, bits=3)
    cache = CrossLayerKVCache(start_layer=0, num_layers=2)
    ks, vs = _similar_kv(2, 8, seed=40)
    _feed(cache, 2, ks, vs)
    with pytest.raises(ValueError, match="batch size 1 but got batch size 2"):
        cache.update(torch.cat([ks[0]] * 2), torch.cat([vs[0]] * 2), 0)
