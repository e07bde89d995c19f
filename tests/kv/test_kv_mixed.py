"""Per-layer KV cache widths (MixedKVCache) equal the uniform caches layer by layer."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import _hf
from openautoglm.kv import KVCacheConfig, MixedKVCache


def _logits(model, ids, cfg):
    cache = cfg.build(model.config)
    with torch.no_grad():
        a = _hf.forward_with_cache(model, ids[:, :200], cache).logits
        b = _hf.forward_with_cache(model, ids[:, 200:], cache).logits
    return torch.cat([a, b], 1), cache


def test_uniform_per_layer_equals_uniform_cache():
    model = make_tiny_llama(0)
    ids = torch.randint(2, 8192, (2, 232), generator=torch.Generator().manual_seed(3))
    for bits in (4, 2):
        got, c1 = _logits(model, ids, KVCacheConfig(bits=(bits,) * 4))
        ref, c2 = _logits(model, ids, KVCacheConfig(bits=bits))
        assert torch.equal(got, ref) and c1.nbytes() == c2.nbytes()
    full, _ = _logits(model, ids, KVCacheConfig(bits=(None, 16, None, None)))
    ref, _ = _logits(model, ids, KVCacheConfig())
    torch.testing.assert_close(full, ref)


def test_mixed_cache_sits_between_and_round_trips():
    model = make_tiny_llama(0)
    ids = torch.randint(2, 8192, (1, 232), generator=torch.Generator().manual_seed(4))
    cfg = KVCacheConfig(bits=[8, None, 2, 4])
    assert cfg.bits == (8, None, 2, 4) and cfg.label() == "per-layer[int8,bf,int2,int4]"
    assert KVCacheConfig.from_dict(cfg.to_dict()) == cfg
    got, cache = _logits(model, ids, cfg)
    assert isinstance(cache, MixedKVCache) and "bits=[8,bf,2,4]" in repr(cache)
    ref, _ = _logits(model, ids, KVCacheConfig())
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


def test_bad_layer_bits():
    with pytest.raises(ValueError, match="layer 1"):
        KVCacheConfig(bits=(4, 3))
    with pytest.raises(ValueError, match="cannot be combined"):
        KVCacheConfig(bits=(4, 4), share=True)
    with pytest.raises(ValueError, match="non-empty"):
        MixedKVCache([])
    with pytest.raises(ValueError, match="4 layers"):
        MixedKVCache([4, 4], config=make_tiny_llama(0).config)
