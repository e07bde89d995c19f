"""openautoglm.generation.generator: the static-cache decode helper gives the tokens transformers' generate gives."""

from __future__ import annotations

import pytest
import torch

from openautoglm.generation.generator import Generator

KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=256, max_position_embeddings=512)


def _model(family: str):
    """A tiny random model; seeded, so greedy near-ties (different summation orders) cannot make a test flaky."""
    import transformers as tf

    torch.manual_seed(0)
    cls, cfg = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
                "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config)}[family]
    extra = {"head_dim": 16} if family == "qwen3" else {}
    return cls(cfg(**KW, **extra)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_tokens_match_transformers(family):
    m = _model(family)
    ids = torch.randint(0, 256, (2, 7))
    ref = m.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    gen = Generator(m)
    out = gen.generate(ids, max_new_tokens=10)
    assert torch.equal(out.tokens, ref)
    assert out.new_tokens == 10 and out.decode_s > 0 and out.tokens_per_s > 0
    assert torch.equal(gen.generate(ids, max_new_tokens=10).tokens, ref)  # state reset between calls


def test_quantized_model_and_layer_graph_reuse():
    """A w4 model decodes like its own transformers generate; compiled, all layers share one graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import openautoglm.generation.generator as G
    from openautoglm.quant import QuantConfig, quantize

    m = _model("llama")
    quantize(m, QuantConfig(scheme="w4", group_size=32))
    ids = torch.randint(0, 256, (1, 5))
    ref = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    counters.clear()
    gen = Generator(m, compile=False)
    gen._dec = torch.compile(G._layer_decode, fullgraph=True, dynamic=False, backend="eager")
    gen._pre = torch.compile(G._layer_prefill, fullgraph=True, dynamic=True, backend="eager")
    assert torch.equal(gen.generate(ids, max_new_tokens=6).tokens, ref)
    assert counters["stats"]["unique_graphs"] == 2  # one decode + one prefill graph for both layers


def test_sampling_eos_and_errors():
    m = _model("llama")
    gen = Generator(m)
    ids = torch.randint(0, 256, (2, 4))
    torch.manual_seed(1)
    a = gen.generate(ids, 8, do_sample=True, temperature=0.7, top_k=50, top_p=0.9).tokens
    torch.manual_seed(1)
    b = gen.generate(ids, 8, do_sample=True, temperature=0.7, top_k=50, top_p=0.9).tokens
    assert torch.equal(a, b) and a.shape == (2, 12)
    first = int(gen.generate(ids[:1], 4).tokens[0, 4])
    out = gen.generate(ids[:1], 40, eos_token_id=first, check_every=4)  # greedy: the first new token is "eos"
    assert out.new_tokens == 5 and bool((out.tokens[0, 4:] == first).all())  # stops at the first check
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(ids, 0)
    with pytest.raises(ValueError, match="cache_len"):
        gen.generate(ids, 8, cache_len=6)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(ids, 8, do_sample=True, top_p=0.0)
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        Generator(gpt2)


def test_min_new_tokens_and_several_eos_match_transformers():
    """EOS held back for min_new_tokens inside the step (as transformers' MinNewTokensLengthLogitsProcessor), any
    of several EOS ids ends a row; the helper keeps its own padding (the first EOS) and check granularity."""
    m = _model("llama")
    ids = torch.randint(0, 256, (2, 5))
    free = Generator(m).generate(ids, 8).tokens[:, 5:]
    eos = [int(free[0, 0]), int(free[1, 0])]  # both rows would end at their first token
    ref = m.generate(ids, max_new_tokens=8, min_new_tokens=3, eos_token_id=eos, pad_token_id=eos[0], do_sample=False)
    out = Generator(m).generate(ids, 8, eos_token_id=eos, min_new_tokens=3, check_every=1)
    assert not torch.isin(out.tokens[:, 5:8], torch.tensor(eos)).any()
    assert torch.equal(out.tokens, ref)  # checked every step: stops where transformers stops
    with pytest.raises(ValueError, match="eos_token_id"):
        Generator(m).generate(ids, 8, eos_token_id=[])
