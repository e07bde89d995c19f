"""The estimator on mixture-of-experts models: weights (float and quantized experts), the KV cache (MLA's latent,
GPT-OSS's sliding layer), the routed activations of prefill and training against CPU allocation traces.

The routed activations follow transformers' default experts path ("grouped_mm": pairs sorted by expert, gathered,
grouped GEMMs, weighted and put back; ``memory/formulas.py``), priced per family from ``_hf.moe.FAMILIES``
(float32 routing weights for Mixtral / DeepSeek-V3, GPT-OSS's clamped SwiGLU and biases).
"""

from __future__ import annotations

import pytest
import torch
from conftest import MOE_FAMILIES, make_tiny

from openautoglm import QuantConfig, _hf, quantize
from openautoglm.memory import MemoryProfiler, estimate_memory, model_bytes
from openautoglm.training.loop import TrainConfig, build_optimizer, prepare_model

MOE = sorted(MOE_FAMILIES)


def _ids(b, t, vocab=8192):
    return torch.randint(2, vocab, (b, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", MOE)
def test_prefill_matches_cpu_trace_and_kv_exact(family):
    model = make_tiny(family, dtype=torch.bfloat16)
    x = _ids(2, 256)
    with MemoryProfiler("cpu", model=model) as prof, torch.inference_mode():
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    est = estimate_memory(model, mode="inference", batch=2, seq_len=256)
    cache = _hf.output_cache(out)
    real_kv = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
    assert est.terms["kv_cache"] == real_kv  # MLA: the latent; GPT-OSS: the sliding layer's last 63 tokens
    assert est.terms["weights"] == model_bytes(model)
    assert abs(est.total / prof.peak_bytes - 1) < 0.03, (est.total, prof.peak_bytes)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("scheme", ["w4", "w8a8"])
def test_quantized_experts_weights_exact_and_prefill_bounded(family, scheme):
    model = make_tiny(family, dtype=torch.bfloat16)
    quantize(model, QuantConfig(scheme=scheme))
    x = _ids(2, 256)
    with MemoryProfiler("cpu", model=model) as prof, torch.inference_mode():
        model(input_ids=x, use_cache=True, logits_to_keep=1)
    est = estimate_memory(model, mode="inference", batch=2, seq_len=256, device="cpu")
    assert est.terms["weights"] == model_bytes(model)
    # device="cpu": the reference loop, expert by expert (formulas.moe_loop_transient). w4: 1.02-1.05x measured;
    # w8a8: an upper bound (1.09-1.17x), as for dense models: the largest quantized Linear's int8 GEMM transient
    # (here the shared expert's, or an expert's) is added on top of the layer's activations
    lo, hi = (0.97, 1.06) if scheme == "w4" else (1.0, 1.20)
    assert lo < est.total / prof.peak_bytes < hi, (est.total, prof.peak_bytes)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_analytic_w4_counts_the_experts(family):
    model = make_tiny(family, dtype=torch.bfloat16)
    est = estimate_memory(model, mode="inference", quantization="w4").terms["weights"]
    quantize(model, QuantConfig(scheme="w4"))
    assert abs(est / model_bytes(model) - 1) < 0.01, (est, model_bytes(model))


@pytest.mark.parametrize("family", MOE)
def test_training_step_matches_cpu_trace(family):
    model = make_tiny(family, dtype=torch.bfloat16, vocab_size=1024)
    tc = TrainConfig(micro_batch=2, seq_len=128, amp="none", optimizer="sgd", progress=False)
    prepare_model(model, tc)
    opt = build_optimizer(model, tc)
    x = _ids(2, 128, 1024)

    def step():
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with MemoryProfiler("cpu", model=model, optimizer=opt) as prof:
        step()
    est = estimate_memory(model, mode="train", batch=2, seq_len=128, optimizer=opt)
    if family == "deepseek_v3":  # MLA's training activations are not modelled, and the estimate says so (0.70x)
        assert any("MLA" in n for n in est.notes) and est.total < prof.peak_bytes
        return
    assert abs(est.total / prof.peak_bytes - 1) < 0.05, (est.total, prof.peak_bytes)  # measured 0.976-0.999x
