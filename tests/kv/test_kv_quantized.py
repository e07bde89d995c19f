"""QuantizedKVCache: packing math, KIVI window logic, attention output vs full precision, memory, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama
from transformers import DynamicCache

from openautoglm import _hf
from openautoglm.kv import KVCacheConfig, QuantizedKVCache, enable_fused_attention, packing
from openautoglm.kv.attention import disable_fused_attention
from openautoglm.kv.kernels import ops
from openautoglm.kv.quantized import resolve_residual
from openautoglm.kv.stores import QuantStore


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    p = packing.pack(q, bits)
    assert p.shape[-1] == 64 * bits // 8
    assert torch.equal(packing.unpack(p, bits), q)


@pytest.mark.parametrize("bits,max_rel", [(8, 0.01), (4, 0.12), (2, 0.5)])
def test_key_value_quantization_error(bits, max_rel):
    k = _rand(2, 3, 64, 32, seed=1)
    k[..., 5] *= 20  # an outlier channel: per-channel key scales must absorb it
    qk = packing.quantize_keys(k, bits, 32)
    assert qk[0].shape == (2, 3, 64, 32 * bits // 8) and qk[1].shape == (2, 3, 2, 32)
    kd = packing.dequantize_keys(*qk, bits, torch.float32)
    v = _rand(2, 3, 64, 32, seed=2)
    qv = packing.quantize_values(v, bits, 16)
    assert qv[1].shape == (2, 3, 64, 2)
    vd = packing.dequantize_values(*qv, bits, torch.float32)
    assert kd.shape == k.shape and vd.shape == v.shape
    for x, xd in ((k, kd), (v, vd)):
        rel = (x - xd).norm() / x.norm()
        assert rel < max_rel, (bits, float(rel))


def test_constant_group_keeps_a_nonzero_scale():
    x = torch.full((1, 1, 16, 16), 0.25)
    q, s, m = packing.quantize_keys(x, 4, 16)
    assert (s > 0).all() and torch.equal(packing.dequantize_keys(q, s, m, 4, torch.float32), x)


def test_window_logic_quantizes_each_block_once():
    st = QuantStore(bits=4, group_size=16, residual_length=32)
    k, v = _rand(1, 2, 100, 16, seed=3), _rand(1, 2, 100, 16, seed=4)
    st.update(k[:, :, :70], v[:, :, :70])  # prefill: 70 = 32 quantized (2 blocks) + 38 in the window
    assert (st.quantized_length, st.res_k.shape[-2]) == (32, 38)
    first_blocks = st.kq.clone()
    for t in range(70, 100):  # decode
        st.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert 32 <= st.res_k.shape[-2] < 32 + 16
    assert st.length == 100 and st.quantized_length == 64
    assert torch.equal(st.kq[:, :, :32], first_blocks)  # old blocks untouched (never re-quantized)
    # the same tokens fed one by one leave the same state (prefill goes through the same rule)
    st2 = QuantStore(bits=4, group_size=16, residual_length=32)
    for t in range(100):
        st2.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert torch.equal(st2.kq, st.kq) and torch.equal(st2.vq, st.vq) and torch.equal(st2.ks, st.ks)
    kk, vv = st.read()
    assert torch.equal(kk[:, :, 64:], k[:, :, 64:])  # the window is exact
    assert F.cosine_similarity(kk.flatten(), k.flatten(), 0) > 0.99


def _decode_logits(model, ids, cache, n_new):
    with torch.no_grad():
        _hf.forward_with_cache(model, ids[:, :-n_new], cache, logits_to_keep=1)
        outs = [_hf.forward_with_cache(model, ids[:, i : i + 1], cache).logits for i in range(ids.shape[1] - n_new, ids.shape[1])]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("bits,min_cos", [(8, 0.9999), (4, 0.999), (2, 0.98)])
def test_logits_vs_full_precision_all_paths(bits, min_cos):
    """Growing and preallocated stores, dequantize-then-attend and fused decode: one function."""
    model = make_tiny_llama()
    ids = torch.randint(2, 8192, (2, 72), generator=torch.Generator().manual_seed(5))
    ref = _decode_logits(model, ids, DynamicCache(config=model.config), 3)
    got = []
    for fused in ((False, True) if bits == 4 else (False,)):
        (enable_fused_attention if fused else disable_fused_attention)(model)
        for cap in ((None, 96) if bits == 4 else (None,)):
            cache = QuantizedKVCache(bits, group_size=16, residual_length=16, config=model.config, max_cache_len=cap)
            got.append(_decode_logits(model, ids, cache, 3))
    disable_fused_attention(model)
    cos = F.cosine_similarity(got[0].flatten(), ref.flatten(), 0)
    assert cos > min_cos, float(cos)
    assert not torch.equal(got[0], ref)  # the cache really was read quantized
    for g in got[1:]:
        assert torch.allclose(g, got[0], atol=1e-4, rtol=1e-4)


def test_attention_output_vs_full_precision():
    """Decode attention over the quantized store vs exact attention (fresh random inputs)."""
    st = QuantStore(bits=4, group_size=32, residual_length=32)
    k, v, q = _rand(1, 2, 256, 32, seed=6), _rand(1, 2, 256, 32, seed=7), _rand(1, 4, 1, 32, seed=8)
    kk, vv = st.update(k, v)  # returns exact K/V for the chunk itself
    assert torch.equal(kk, k)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)).transpose(1, 2)
    got = st.decode(q, None, 32 ** -0.5)
    assert got.shape == (1, 1, 4, 32)
    assert F.cosine_similarity(got.flatten(), ref.flatten(), 0) > 0.98
    mask = torch.ones(1, 256, dtype=torch.bool)
    mask[:, :100] = False  # a padding mask: the first 100 positions are not attended
    ref = F.scaled_dot_product_attention(q, k[:, :, 100:].repeat_interleave(2, 1),
                                         v[:, :, 100:].repeat_interleave(2, 1)).transpose(1, 2)
    assert F.cosine_similarity(st.decode(q, mask, 32 ** -0.5).flatten(), ref.flatten(), 0) > 0.98


def test_generate_and_memory_freed(tokenizer):
    model = make_tiny_llama()
    ids = torch.randint(2, 8192, (1, 300), generator=torch.Generator().manual_seed(9))
    ref = DynamicCache(config=model.config)
    cache = QuantizedKVCache(4, group_size=16, residual_length=32, config=model.config)
    out = _hf.generate_with_cache(model, ids, cache, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 308) and cache.get_seq_length() == 307
    with torch.no_grad():
        _hf.forward_with_cache(model, ids, ref)
    full = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes() for layer in ref.layers)
    # measured: the distinct storages the cache keeps alive (a kept slice of the prefill would count whole)
    held = cache.nbytes()
    assert held < 0.45 * full * 307 / 300, (held, full)
    for layer in cache.layers:
        assert layer.slot.res_k.untyped_storage().nbytes() == layer.slot.res_k.numel() * layer.slot.res_k.element_size()


def test_residual_auto_sizes_the_window_to_the_context():
    assert resolve_residual("auto", 64, 2048) == 0
    assert resolve_residual("auto", 64, 8192) == 128 and resolve_residual("auto", 64, 4096) == 64
    assert resolve_residual("auto", 64, None) == 128 and resolve_residual(32, 64, 2048) == 32
    assert resolve_residual("auto", 64, 2048, bits=2) == 128 and resolve_residual("auto", 64, 1024, bits=2) == 64
    # head_dim 16, int4, group 16: the quantized bytes alone, no window at a short context
    model = make_tiny_llama()
    cache = KVCacheConfig(bits=4, group_size=16).build(model.config, context=256)
    with torch.no_grad():
        _hf.forward_with_cache(model, torch.randint(2, 8192, (1, 256)), cache)
    per_token = packing.bytes_per_token(4, 16, 16, 16) * 2 * 4  # 2 KV heads, 4 layers
    assert cache.residual_length == 0 and cache.nbytes() == pytest.approx(256 * per_token, rel=0.01)


def test_config_roundtrip_and_build(tiny_llama):
    cfg = KVCacheConfig(bits=4, group_size=32, residual_length=64, share_layers=((0, 2),))
    assert KVCacheConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.build(tiny_llama.config), QuantizedKVCache)
    assert isinstance(KVCacheConfig().build(tiny_llama.config), DynamicCache)
    old = {"bits": 4, "group_size": 64, "residual_length": 128, "share": False, "share_start": None,
           "share_threshold": 0.9, "version": 1}  # a version-1 record still loads
    assert KVCacheConfig.from_dict(old).residual_length == 128


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits=3"),
    (dict(bits=16), "bits=16"),
    (dict(bits=4, group_size=48), "group_size=48"),
    (dict(bits=4, residual_length=-1), "residual_length"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(**kwargs)
    with pytest.raises(ValueError, match=match):
        KVCacheConfig(**kwargs)


def test_bad_cache_arguments(tiny_llama):
    cfg = tiny_llama.config
    with pytest.raises(ValueError, match="max_cache_len"):
        QuantizedKVCache(4, config=cfg, max_cache_len=0)
    with pytest.raises(ValueError, match="earlier layer"):
        QuantizedKVCache(4, config=cfg, share={1: 2})
    with pytest.raises(ValueError, match="has 4 layers"):
        QuantizedKVCache(4, config=cfg, share={7: 1})
    with pytest.raises(ValueError, match="share_layers"):
        KVCacheConfig(share_layers=((2, 1),))


def test_value_group_must_divide_head_dim():
    st = QuantStore(bits=4, group_size=16, residual_length=0)
    with pytest.raises(ValueError, match="head_dim=24"):
        st.update(_rand(1, 1, 16, 24), _rand(1, 1, 16, 24))


def test_batch_size_reuse_is_an_error():
    model = make_tiny_llama()
    cache = QuantizedKVCache(4, group_size=16, residual_length=16, config=model.config)
    with torch.no_grad():
        _hf.forward_with_cache(model, torch.randint(2, 8192, (2, 20)), cache)
        with pytest.raises(ValueError, match="batch size 2 but got batch size 3"):
            _hf.forward_with_cache(model, torch.randint(2, 8192, (3, 1)), cache)
        cache.reset()
        _hf.forward_with_cache(model, torch.randint(2, 8192, (3, 20)), cache)  # fine after reset
    assert cache.get_seq_length() == 20


def test_unsupported_attention_is_an_error():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    QuantizedKVCache(4, config=MistralConfig(sliding_window=64, num_hidden_layers=2))  # sliding window: served
    QuantizedKVCache(4, config=Qwen2Config(use_sliding_window=False, num_hidden_layers=2))
    mla = LlamaConfig(num_hidden_layers=2)
    mla.kv_lora_rank = 512
    with pytest.raises(ValueError, match="latent attention"):
        QuantizedKVCache(4, config=mla)
    xattn = LlamaConfig(num_hidden_layers=2)
    xattn.add_cross_attention = True
    with pytest.raises(ValueError, match="cross-attention"):
        QuantizedKVCache(4, config=xattn)
    odd = LlamaConfig(num_hidden_layers=2)
    odd.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        QuantizedKVCache(4, config=odd)


def test_gather_matches_the_packed_math():
    k, v = _rand(2, 2, 64, 32, seed=11), _rand(2, 2, 64, 32, seed=12)
    st = QuantStore(bits=4, group_size=32, residual_length=0)
    st.append(k, v)
    kk, vv = ops.gather(st.view(), 0, 64, torch.float32)
    assert torch.equal(kk, packing.dequantize_keys(*packing.quantize_keys(k, 4, 32), 4, torch.float32))
    assert torch.equal(vv, packing.dequantize_values(*packing.quantize_values(v, 4, 32), 4, torch.float32))


@pytest.mark.parametrize("bits,residual,static", [(8, 16, False), (4, "auto", False), (2, 32, True), (4, "auto", True)])
def test_estimator_kv_term_matches_the_store(bits, residual, static):
    """memory.estimate's KV term is the bytes the cache really holds (growing and preallocated stores)."""
    from openautoglm.memory.estimate import estimate_memory

    model = make_tiny_llama()
    n = 150
    kv = KVCacheConfig(bits=bits, group_size=16, residual_length=residual)
    cache = kv.build(model.config, max_cache_len=n if static else None, context=n)
    with torch.no_grad():
        _hf.forward_with_cache(model, torch.randint(2, 8192, (2, n)), cache, logits_to_keep=1)
    est = estimate_memory(model.config, mode="inference", batch=2, seq_len=n, dtype="fp32",
                          kv_dtype=f"int{bits}", kv_group_size=16, kv_residual=residual, kv_static=static)
    length_tensors = 8 * 4 if static else 0  # the static stores' device length (int64 per layer)
    assert est.terms["kv_cache"] + length_tensors == cache.nbytes()
