"""Every capability on one tiny random model per family (kvpress-style matrix over ``conftest.FAMILIES`` and
``conftest.MOE_FAMILIES``): Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``),
GPT-2 (``Conv1D``); Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE (shared expert), DeepSeek-V3 (MLA, shared expert, a dense
first layer), GPT-OSS (transposed interleaved experts with biases, attention sinks). A capability that does not
apply to a family is left out of its row with the reason (``NOT_APPLICABLE``), and that refusal is tested too.

Each test checks a float reference on fresh random inputs: quantized logits (cosine), quantized-KV decode logits
against the full-precision forward, pruned heads against masked heads, estimates against a CPU allocation trace;
and every compressed model reloads to identical logits.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import FAMILIES, MOE_FAMILIES, make_tiny

from openautoglm import AutoModelForCausalLM, QuantConfig, _hf, hub, quantize
from openautoglm.kv import QuantizedKVCache
from openautoglm.memory import MemoryProfiler, estimate_memory
from openautoglm.prune import HeadPruner, mask_heads, remove_heads
from openautoglm.quant import quantized_layers

MIN_COS = {"w8a8": 0.999, "w4": 0.95}  # as tests/quant/test_quant_model.py
# GPT-OSS at w4 on random weights: 0.941 with everything quantized and 0.945 with the experts left float (seed 0),
# 0.992 with its attention left float -- its attention (sinks, biases) is what w4 moves, not the experts
MIN_COS_FAMILY = {("gpt_oss", "w4"): 0.93}
DENSE, MOE = sorted(FAMILIES), sorted(MOE_FAMILIES)
# capability -> {family: why it does not apply}; each refusal is asserted in test_not_applicable_is_refused_by_name
NOT_APPLICABLE = {
    "kv_cache": {"deepseek_v3": "multi-head latent attention (MLA) is not supported by the compressed KV caches"},
    "head_pruning": {"deepseek_v3": "DeepseekV3Attention has none of the attention layouts",
                     "olmoe": "normalizes q over all heads together"},
}


def families(capability: str | None = None, pool=None) -> list[str]:
    skip = NOT_APPLICABLE.get(capability, {})
    return [f for f in (pool or DENSE + MOE) if f not in skip]


def _ids(b=2, t=24, seed=1234):
    return torch.randint(2, 8192, (b, t), generator=torch.Generator().manual_seed(seed))


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0))


def _projection_count(model) -> int:
    """Linear-like layers and fused-experts modules of the decoder (what quantization should take: all but
    lm_head)."""
    return sum(1 for _, m in _hf.decoder_layers(model).named_modules() if _hf.is_linear_like(m) or _hf.moe.is_experts(m))


# Qwen2-MoE's shared_expert_gate is a Linear(hidden, 1): one output row, below the kernels' multiple of 16
EXPECTED_SKIPS = {"qwen2_moe": {"model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"}}


@pytest.mark.parametrize("family", families())
@pytest.mark.parametrize("scheme", ["w8a8", "w4"])
def test_quantize_and_reload(family, scheme, tmp_path):
    model = make_tiny(family)
    x = _ids()
    with torch.no_grad():
        ref = model(x).logits
    n = _projection_count(model)
    res = quantize(model, QuantConfig(scheme=scheme))
    skips = EXPECTED_SKIPS.get(family, set())
    assert len(res.quantized) == n - len(skips) and set(res.skipped) == skips, (res.quantized, res.skipped)
    with torch.no_grad():
        out = model(x).logits
    assert _cos(out, ref) > MIN_COS_FAMILY.get((family, scheme), MIN_COS[scheme])
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert quantized_layers(again) == quantized_layers(model)
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)


@pytest.mark.parametrize("family", families("kv_cache"))
def test_quantized_kv_cache_in_generate(family):
    model = make_tiny(family)
    x = _ids(1, 40)
    cache = QuantizedKVCache(bits=8, group_size=16, residual_length=8, config=model.config)
    with torch.no_grad():
        full = model(x).logits[:, -1]
        _hf.forward_with_cache(model, x[:, :-1], cache)     # prefill 39 tokens: 32 quantized, 7 in the window
        step = _hf.forward_with_cache(model, x[:, -1:], cache).logits[:, -1]
    assert cache.stats()["quantized_tokens"] >= 32
    assert _cos(step, full) > 0.999
    cache = QuantizedKVCache(bits=4, group_size=16, residual_length=8, config=model.config)
    out = _hf.generate_with_cache(model, x, cache, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 46) and cache.get_seq_length() == 45


@pytest.mark.parametrize("family", families("head_pruning"))
def test_head_pruning_equals_masking_and_reloads(family, tmp_path):
    model = make_tiny(family)
    x = _ids()
    heads = {0: [0, 1, 2], 1: [5]}  # layer 0 uneven GQA groups where the family has GQA
    with torch.no_grad(), mask_heads(model, heads):
        ref = model(x).logits
    layouts = remove_heads(model, heads)
    with torch.no_grad():
        out = model(x).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    assert [len(lay) for lay in layouts] == [5, 7]
    model.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert [_hf.attention_layout(a) for _, a in _hf.attention_modules(again)] == layouts
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)
    gen = again.generate(x[:1], max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert gen.shape == (1, 28)


@pytest.mark.parametrize("family", families("head_pruning"))
def test_head_pruner_scores_every_family(family):
    """Taylor importance hooks the output projection (o_proj / c_proj) of each family, then prunes."""
    model = make_tiny(family)
    res = HeadPruner(importance="taylor", ratio=0.25, batch_size=2).prune(model, calib_ids=_ids(4, 16),
                                                                           progress=False)
    assert sum(q for q, _ in res.heads_after) == 12 and res.attn_weight_bytes_after < res.attn_weight_bytes_before
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


@pytest.mark.parametrize("family", families("head_pruning"))
def test_estimator_matches_cpu_trace_and_pruned_kv(family):
    model = make_tiny(family, dtype=torch.bfloat16)
    remove_heads(model, {0: [0, 1, 2, 3]})  # GQA: a whole KV group (and its cache slot) goes; GPT-2: 4 of 8
    x = _ids(2, 256)
    with MemoryProfiler("cpu", model=model) as prof, torch.inference_mode():
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    est = estimate_memory(model, mode="inference", batch=2, seq_len=256)
    assert abs(est.total / prof.peak_bytes - 1) < 0.06, (est.total, prof.peak_bytes)
    cache = _hf.output_cache(out)
    real_kv = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
    assert est.terms["kv_cache"] == real_kv
    assert hub.applied_transforms(model)[0]["type"] == "prune_heads"


def test_unsupported_attention_layout_is_refused_by_name():
    """GPT-NeoX fuses q/k/v per head (query_key_value) in a layout head surgery does not know: a clear TypeError
    naming the layouts supported and what the module has; its Linear layers still quantize."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_neox", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(TypeError, match=r"layer 0 of GPTNeoXForCausalLM: GPTNeoXAttention has none of .*"
                                        r"qkv_proj/o_proj.*c_attn/c_proj.*it has \['dense', 'query_key_value'\]"):
        remove_heads(model, {0: [0]})
    assert len(quantize(model, QuantConfig(scheme="w8")).quantized) == 8


@pytest.mark.parametrize("family", families())
def test_quantize_on_load_equals_quantize_after_load(family, tmp_path):
    """Streaming quantize-on-load (GPT-2's Conv1D included) gives the modules of quantizing the loaded model."""
    model = make_tiny(family)
    model.save_pretrained(tmp_path / "f")
    x = _ids()
    cfg = QuantConfig(scheme="w8")
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization=cfg)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    quantize(after, cfg)
    assert quantized_layers(on_load) == quantized_layers(after) and len(quantized_layers(after)) > 0
    with torch.no_grad():
        assert torch.equal(on_load(x).logits, after(x).logits)


@pytest.mark.parametrize("capability,family", [(c, f) for c, fs in NOT_APPLICABLE.items() for f in sorted(fs)])
def test_not_applicable_is_refused_by_name(capability, family):
    """Where a capability does not apply, it says so (naming the family's layout) instead of computing garbage."""
    model = make_tiny(family)
    with pytest.raises((TypeError, ValueError), match=re.escape(NOT_APPLICABLE[capability][family])):
        if capability == "kv_cache":
            QuantizedKVCache(bits=8, group_size=16, residual_length=8, config=model.config)
        else:
            remove_heads(model, {1: [0]})


@pytest.mark.parametrize("family", MOE)
def test_moe_layout_table_matches_transformers(family):
    """``_hf.moe.FAMILIES`` describes each family's experts as the installed transformers builds them."""
    from openautoglm._hf import moe

    model = make_tiny(family)
    fam = moe.family_of(model.config)
    experts = dict(moe.experts_modules(model))
    assert experts and {type(m).__name__ for m in experts.values()} == {fam.experts_class}
    assert {moe.layout_of(m) for m in experts.values()} == {fam.layout}
    block = moe.moe_block(_hf.decoder_layers(model)[-1])
    assert moe.router_of(block) is getattr(block, fam.router)
    assert (moe.shared_of(block) is not None) == (fam.shared is not None)
    assert moe.top_k(block, model.config) == 2 and moe.sizes(block.experts) == (4, 128, 128)


@pytest.mark.parametrize("family", MOE)
def test_moe_checkpoint_with_per_expert_tensors_reloads(family, tmp_path):
    """transformers saves MoE checkpoints in their original per-expert layout (Mixtral: block_sparse_moe.experts.N.w1,
    Qwen: mlp.experts.N.gate_proj, ...); the lazy loader follows transformers' key conversion and stacks them."""
    model = make_tiny(family)
    model.save_pretrained(tmp_path / "f")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    x = _ids()
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
