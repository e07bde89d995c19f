"""StaticQuantStore (preallocated, CUDA-graph safe) and the fused decode path in generate / a compiled step."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import _hf
from openautoglm.kv import QuantizedKVCache, enable_fused_attention
from openautoglm.kv.static_store import StaticQuantStore
from openautoglm.kv.stores import QuantStore


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,window", [(4, 0), (2, 40)])
def test_static_store_matches_the_growing_store(bits, window):
    k, v = _rand(2, 2, 150, 16, seed=1), _rand(2, 2, 150, 16, seed=2)
    st = StaticQuantStore(bits, 16, 16, capacity=160, window=window)
    dyn = QuantStore(bits, 16, 16, window=window)
    ptrs = None
    for lo, hi in [(0, 37), *[(t, t + 1) for t in range(37, 70)], (70, 130), *[(t, t + 1) for t in range(130, 150)]]:
        for s in (st, dyn):
            s.append(k[:, :, lo:hi], v[:, :, lo:hi])
        if ptrs is None:
            ptrs = [t.data_ptr() for t in st.tensors()]
        a, b = st.read(), dyn.read()
        lo_keep = max(0, hi - window) // 16 * 16 if window else 0  # positions the window can still see
        assert torch.equal(a[0][:, :, lo_keep:], b[0][:, :, lo_keep:]) and torch.equal(a[1][:, :, lo_keep:], b[1][:, :, lo_keep:])
    assert [t.data_ptr() for t in st.tensors()] == ptrs  # never reallocated
    if window:  # the growing store dropped the blocks no window can see
        assert dyn.ks.shape[2] <= -(-window // 16) + 1


def test_static_store_capacity_and_reset():
    st = StaticQuantStore(4, 16, 16, capacity=40)
    st.append(_rand(1, 1, 30, 16), _rand(1, 1, 30, 16))
    with pytest.raises(ValueError, match="at most 40 tokens"):
        st.append(_rand(1, 1, 20, 16), _rand(1, 1, 20, 16))
    for _ in range(10):
        st.append(_rand(1, 1, 1, 16), _rand(1, 1, 1, 16))
    with pytest.raises(ValueError, match="max_cache_len"):
        st.append(_rand(1, 1, 1, 16), _rand(1, 1, 1, 16))
    ptrs = [t.data_ptr() for t in st.tensors()]
    st.reset()
    assert st.length == 0 and [t.data_ptr() for t in st.tensors()] == ptrs
    with pytest.raises(ValueError, match="capacity"):
        StaticQuantStore(4, 16, 16, capacity=0)


def test_generate_with_static_fused_cache_matches_growing_cache():
    model = make_tiny_llama()
    ids = torch.randint(2, 8192, (1, 90), generator=torch.Generator().manual_seed(3))
    ref = _hf.generate_with_cache(model, ids, QuantizedKVCache(4, 16, 16, config=model.config), max_new_tokens=6,
                                  do_sample=False, pad_token_id=1)
    enable_fused_attention(model)
    cache = QuantizedKVCache(4, 16, 16, config=model.config, max_cache_len=100)
    out = _hf.generate_with_cache(model, ids, cache, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(out, ref) and int(cache.get_seq_length()) == 95
    assert cache.is_compileable


def test_compiled_decode_step_captures_the_fused_op():
    """torch.compile(fullgraph=True) traces the whole decode step: no graph break at the cache or kernel."""
    model = make_tiny_llama(num_hidden_layers=2)
    enable_fused_attention(model)
    ids = torch.randint(2, 8192, (2, 40), generator=torch.Generator().manual_seed(4))
    caches = [QuantizedKVCache(4, 16, 16, config=model.config, max_cache_len=64) for _ in range(2)]
    kw = _hf.cache_kwarg(model)
    with torch.no_grad():
        for c in caches:
            last = model(input_ids=ids, **{kw: c}, use_cache=True, logits_to_keep=1).logits.argmax(-1)

    def step(tok, pos, cache):
        return model(input_ids=tok, position_ids=pos, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    toks = []
    with torch.no_grad():
        for fn, cache in ((step, caches[0]), (compiled, caches[1])):
            tok, pos, seq = last.clone(), torch.full((2, 1), 40), []
            for _ in range(4):  # crosses a block flush (window 16 + group 16 -> every 16 tokens from 32)
                tok = fn(tok, pos, cache)
                pos = pos + 1
                seq.append(tok)
            toks.append(torch.cat(seq, 1))
    assert torch.equal(*toks)
    assert int(caches[1].layers[0].slot.length_t) == 44


def test_generator_with_quantized_cache():
    """openautoglm.generation.generator.Generator(kv=...): the same tokens as model.generate with the same quantized cache;
    compiled, the fused decode layer graph is shared by the layers (one graph with a store, one reading another's)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from openautoglm.generation import kv_decode as fast_decode
    from openautoglm.generation.generator import Generator
    from openautoglm.kv import KVCacheConfig

    model = make_tiny_llama(num_hidden_layers=3)
    ids = torch.randint(2, 8192, (2, 40), generator=torch.Generator().manual_seed(6))
    kv = KVCacheConfig(bits=4, group_size=16, residual_length=16, share_layers=((0, 2),))
    cache = kv.build(model.config)
    ref = _hf.generate_with_cache(model, ids, cache, max_new_tokens=12, do_sample=False, pad_token_id=1)
    torch._dynamo.reset()
    counters.clear()
    gen = Generator(model, compile=False, kv=kv)
    gen._dec_kv = torch.compile(fast_decode.layer_decode, fullgraph=True, dynamic=False, backend="eager")
    out = gen.generate(ids, max_new_tokens=12)
    assert torch.equal(out.tokens, ref)
    assert counters["stats"]["unique_graphs"] == 2  # layers 0, 1 (own store) and layer 2 (reads layer 0's)
    st = next(iter(gen._state.values()))["kv"]
    assert st.stores[2] is st.stores[0] and int(st.stores[0].length_t) == 40 + 11
    with pytest.raises(ValueError, match="quantized cache"):
        Generator(model, kv=KVCacheConfig(share=True))
