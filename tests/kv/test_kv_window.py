"""Sliding-window layers (Mistral): exact while inside the window, a ring of the window's size beyond it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from openautoglm import _hf
from openautoglm.kv import QuantizedKVCache, enable_fused_attention
from openautoglm.kv.attention import disable_fused_attention

WINDOW = 32


def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                        max_position_embeddings=256, pad_token_id=1)
    return MistralForCausalLM(cfg).eval()


def _logits(model, ids, cache, prefill):
    with torch.no_grad():
        _hf.forward_with_cache(model, ids[:, :prefill], cache, logits_to_keep=1)
        return torch.cat([_hf.forward_with_cache(model, ids[:, i : i + 1], cache).logits
                          for i in range(prefill, ids.shape[1])], 1)


def test_window_layers_are_found():
    model = _tiny_mistral()
    assert _hf.layer_windows(model.config) == [WINDOW, WINDOW]
    cache = QuantizedKVCache(8, 16, 16, config=model.config)
    assert cache.is_sliding == [True, True] and cache.layers[0].slot.window == WINDOW


def test_inside_the_window_it_is_the_full_attention_cache():
    model = _tiny_mistral()
    ids = torch.randint(2, 512, (1, WINDOW), generator=torch.Generator().manual_seed(1))
    windowed = _logits(model, ids, QuantizedKVCache(4, 16, 0, config=model.config), 20)
    full = _logits(model, ids, QuantizedKVCache(4, 16, 0, num_layers=2), 20)  # no config: no window
    assert torch.equal(windowed, full)


def test_beyond_the_window_matches_transformers_sliding_cache():
    """Growing store (dequantize + sdpa) and preallocated store (fused decode): both a ring of the window."""
    model = _tiny_mistral()
    ids = torch.randint(2, 512, (1, 90), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, ids, DynamicCache(config=model.config), 60)
    outs = []
    for cap in (None, 96):
        (enable_fused_attention if cap else disable_fused_attention)(model)
        cache = QuantizedKVCache(8, 16, 16, config=model.config, max_cache_len=cap)
        outs.append(_logits(model, ids, cache, 60))
        slot = cache.layers[0].slot
        assert slot.ks.shape[2] <= WINDOW // 16 + 1  # a ring of the window's size, not the whole context
    disable_fused_attention(model)
    assert F.cosine_similarity(outs[0].flatten(), ref.flatten(), 0) > 0.999
    assert torch.allclose(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def test_default_window_is_auto_like_the_config():
    """``QuantizedKVCache(bits=..., config=...)`` (no context given) sizes its window from the prompt, so it holds
    what the config-built cache for that context holds; an explicit window is kept."""
    import torch

    from conftest import make_tiny_llama
    from openautoglm import _hf
    from openautoglm.kv import KVCacheConfig, QuantizedKVCache

    model = make_tiny_llama()
    n = 4096
    ids = torch.randint(2, 8000, (1, n), generator=torch.Generator().manual_seed(3))
    for bits, group in ((8, 64), (4, 32), (2, 32)):
        seed_style = QuantizedKVCache(bits=bits, group_size=group, config=model.config)
        assert seed_style.residual_length == "auto"
        by_config = KVCacheConfig(bits=bits, group_size=group).build(model.config, context=n)
        with torch.no_grad():
            _hf.forward_with_cache(model, ids, seed_style)
            _hf.forward_with_cache(model, ids, by_config)
        want = {8: 64, 4: 64, 2: 256}[bits]  # 4096 / 64 (/ 16 at 2 bits), capped at 128 -> whole groups
        want = min(want, 128) // group * group
        assert seed_style.residual_length == by_config.residual_length == want, (bits, seed_style.residual_length)
        assert seed_style.nbytes() == by_config.nbytes()
        assert seed_style.stats()["quantized_tokens"] == (n - want) // group * group
    assert QuantizedKVCache(bits=4, residual_length=32, config=model.config).residual_length == 32
