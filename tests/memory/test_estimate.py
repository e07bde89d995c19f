"""The estimator: hand-computed terms, exact parameter/gradient/optimizer bytes, totals vs a CPU allocation trace."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLAMA, make_tiny_llama

from openautoglm.memory import MemoryProfiler, estimate_memory
from openautoglm.memory import formulas as F
from openautoglm.memory.shapes import LayerShape, model_shape
from openautoglm.training.loop import TrainConfig, autocast_ctx, build_optimizer, prepare_model

CFG = {"model_type": "llama", **TINY_LLAMA}


def test_shape_from_config_dict_matches_real_model():
    s = model_shape(CFG)
    real = make_tiny_llama()
    assert s.n_params == sum(p.numel() for p in real.parameters())
    assert (s.hidden, s.vocab, s.num_layers, s.tied) == (128, 8192, 4, False)
    assert s.layers[0] == LayerShape(heads=8, kv_heads=2, head_dim=16, intermediate=256)
    # q 128x128, k/v 128x32, o 128x128, gate/up/down 128x256
    assert s.layer_linear_params[0] == 128 * 128 * 2 + 128 * 32 * 2 + 3 * 128 * 256


def test_layer_formulas_by_hand():
    L = LayerShape(8, 2, 16, 256)
    h = 128
    # pure bf16: 2 RMSNorms x (4h fp32 + 2h normalized + 2h out) + q,k,v,out (2 B) + lse (4 B x heads) + 4 x 2 B x I
    assert F.layer_saved(L, h, rb=2, cb=2, autocast=False) == 16 * h + 2 * (2 * 128 + 2 * 32) + 4 * 8 + 8 * 256
    # autocast with fp32 residual: norms 4h + 4h + casts (3 and 2 consumers x 2h)
    assert F.layer_saved(L, h, rb=4, cb=2, autocast=True) == 26 * h + 2 * (2 * 128 + 2 * 32) + 4 * 8 + 8 * 256
    # fp32 everywhere: norms 3 x 4h each, attention and MLP at 4 B
    assert F.layer_saved(L, h, rb=4, cb=4, autocast=False) == 24 * h + 4 * (2 * 128 + 2 * 32) + 4 * 8 + 16 * 256


def test_inference_terms_by_hand():
    e = estimate_memory(CFG, mode="inference", batch=2, seq_len=100, dtype="bf16")
    n = model_shape(CFG).n_params
    buffers = e.terms["weights"] - n * 2  # the rotary inv_freq buffer (fp32)
    assert 0 < buffers <= 4 * 16
    assert e.terms["kv_cache"] == 2 * 4 * 2 * 16 * 200 * 2
    # the logits (last position only, as generate does) come after the layers: not alive at the layer peak
    assert e.phase == "prefill: decoder layers" and e.terms["logits"] == 0
    w_kv = e.terms["weights"] + e.terms["kv_cache"]
    assert e.phases["prefill: lm_head"] == w_kv + 200 * 128 * 2 + 8 * 200 + 2 * 8192 * 2  # final hidden + ids + logits
    full = estimate_memory(CFG, mode="inference", seq_len=1128, dtype="bf16").terms["kv_cache"]
    e8 = estimate_memory(CFG, mode="inference", seq_len=1128, dtype="bf16", kv_dtype="int8",
                         kv_residual=128).terms["kv_cache"]
    # openautoglm's KIVI store: 960 tokens in whole 64-token int8 blocks (keys: fp16 scale + min per block and
    # channel; values: per token and group of min(64, head_dim=16) channels), the 168 newest in bf16
    assert e8 == full * 168 // 1128 + 4 * 2 * 960 * (2 * 16 + 4 * 16 / 64 + 4 * 16 / 16)
    # the default window is the caches' default, "auto": at most 1128 / 64 tokens in whole groups = none here,
    # so 17 blocks (1088 tokens) are int8 and the 40 newest bf16
    auto = estimate_memory(CFG, mode="inference", seq_len=1128, dtype="bf16", kv_dtype="int8").terms["kv_cache"]
    assert auto == full * 40 // 1128 + 4 * 2 * 1088 * (2 * 16 + 4 * 16 / 64 + 4 * 16 / 16)
    shared = estimate_memory(CFG, mode="inference", seq_len=1128, dtype="bf16", kv_shared_layers=2).terms["kv_cache"]
    assert shared == full // 2  # 2 of 4 layers reuse a neighbour's K/V
    tp2 = estimate_memory(CFG, mode="inference", seq_len=1128, dtype="bf16", tp_degree=2)
    assert tp2.terms["kv_cache"] == full // 2  # KV heads sharded over 2 ranks
    q = estimate_memory(CFG, mode="inference", dtype="bf16", quantization={"bits": 4, "group_size": 128, "symmetric": True})
    lin = sum(model_shape(CFG).layer_linear_params)
    assert q.terms["weights"] == int(n * 2 + buffers - lin * 2 + lin / 2 + lin / 128 * 2)


@pytest.mark.parametrize("amp,opt", [("none", "adamw"), ("bf16", "adamw"), ("none", "sgd")])
def test_param_grad_optimizer_bytes_exact_on_cpu(amp, opt):
    model = make_tiny_llama(0, torch.float32 if amp != "none" else torch.bfloat16)
    cfg = TrainConfig(micro_batch=2, seq_len=32, amp=amp, optimizer=opt, progress=False)
    prepare_model(model, cfg)
    optim = build_optimizer(model, cfg)
    x = torch.randint(2, 8192, (2, 32))
    with autocast_ctx(torch.device("cpu"), amp):
        model(input_ids=x, labels=x).loss.backward()
    optim.step()
    states = sum(t.numel() * t.element_size() for st in optim.state.values() for t in st.values() if torch.is_tensor(t))
    for how in (opt, optim):  # by name on the CPU, and read from the live optimizer
        est = estimate_memory(model, mode="train", batch=2, seq_len=32, amp=amp, optimizer=how, device="cpu")
        s = est.settings
        assert s["param_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
        assert s["grad_bytes"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        assert s["optimizer_state_bytes"] == states


def _measure(amp, ckpt, accum):
    model = make_tiny_llama(0, torch.float32 if amp != "none" else torch.bfloat16, vocab_size=1024, hidden_size=128,
                            intermediate_size=512, num_hidden_layers=2)
    cfg = TrainConfig(micro_batch=2, seq_len=128, amp=amp, grad_checkpointing=ckpt, grad_accum=accum, progress=False)
    prepare_model(model, cfg)
    opt = build_optimizer(model, cfg)
    x = torch.randint(2, 1024, (2, 128))

    def step():
        for _ in range(accum):
            with autocast_ctx(torch.device("cpu"), amp):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocates the optimizer states: the estimate is the steady state
    with MemoryProfiler("cpu", model=model, optimizer=opt) as prof:
        step()
    est = estimate_memory(model, mode="train", batch=2, seq_len=128, amp=amp, grad_checkpointing=ckpt, grad_accum=accum,
                          optimizer=opt)
    return est.total, prof.peak_bytes


@pytest.mark.parametrize("amp,ckpt,accum", [("none", False, 1), ("bf16", False, 2), ("bf16", True, 1), ("none", True, 2)])
def test_training_total_matches_cpu_allocation_trace(amp, ckpt, accum):
    est, measured = _measure(amp, ckpt, accum)
    assert abs(est / measured - 1) < 0.05, (est, measured)


def test_inference_total_matches_cpu_allocation_trace():
    model = make_tiny_llama(0, torch.bfloat16, vocab_size=1024, hidden_size=128, intermediate_size=512)
    x = torch.randint(2, 1024, (2, 512))
    with MemoryProfiler("cpu", model=model) as prof, torch.inference_mode():
        model(input_ids=x, use_cache=True, logits_to_keep=1)
    est = estimate_memory(model, mode="inference", batch=2, seq_len=512)
    assert abs(est.total / prof.peak_bytes - 1) < 0.06, (est.total, prof.peak_bytes)


@pytest.mark.parametrize("model_type,extra", [
    ("mistral", {}), ("qwen2", {}), ("qwen3", {"head_dim": 16}), ("gemma", {"head_dim": 16}), ("phi3", {}),
    ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
              "attn_pdrop": 0.0}),
])
def test_other_families_from_config_alone_match_cpu_trace(model_type, extra):
    """Each family, estimated from its config dict, vs the CPU allocation trace of a real training step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {} if model_type == "gpt2" else dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2)
    cfg = {"model_type": model_type, "vocab_size": 512, "pad_token_id": 0, **base, **extra}
    real = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).to(torch.bfloat16)
    assert model_shape(cfg).n_params == sum(p.numel() for p in real.parameters())
    tc = TrainConfig(micro_batch=2, seq_len=128, amp="none", optimizer="sgd", progress=False)
    prepare_model(real, tc)
    opt = build_optimizer(real, tc)
    x = torch.randint(2, 512, (2, 128))

    def step():
        real(input_ids=x, labels=x, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with MemoryProfiler("cpu", model=real, optimizer=opt) as prof:
        step()
    est = estimate_memory(cfg, mode="train", batch=2, seq_len=128, dtype="bf16", optimizer="sgd", device="cpu")
    assert abs(est.total / prof.peak_bytes - 1) < 0.05, (est.total, prof.peak_bytes)
    assert "total" in str(estimate_memory(cfg, mode="inference", seq_len=64))


def test_clear_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        estimate_memory({"model_type": "llama", "vocab_size": 10, "hidden_size": 0, "num_hidden_layers": 2,
                         "num_attention_heads": 2})
    with pytest.raises(ValueError, match="model_type"):
        estimate_memory({"hidden_size": 64})
    with pytest.raises(ValueError, match="mode"):
        estimate_memory(CFG, mode="serve")
    with pytest.raises(ValueError, match="batch"):
        estimate_memory(CFG, batch=0)
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(CFG, mode="train", optimizer="lamb")
    with pytest.raises(ValueError, match="tp_degree"):
        estimate_memory(CFG, tp_degree=3)
    with pytest.raises(ValueError, match="quantized"):
        estimate_memory(CFG, mode="train", quantization="w4")
    with pytest.raises(ValueError, match="kv_dtype"):
        estimate_memory(CFG, kv_dtype="int3")
    with pytest.raises(TypeError):
        estimate_memory(42)


def test_model_bytes_counts_wrapper_subclasses_through_inner_tensors():
    # torchao's quantized weights are wrapper subclasses whose storage cannot be read directly.
    from torch.testing._internal.two_tensor import TwoTensor

    from openautoglm.memory.estimate import model_bytes

    lin = torch.nn.Linear(16, 8, bias=False)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    lin.weight = torch.nn.Parameter(TwoTensor(a, b), requires_grad=False)
    assert model_bytes(lin) == a.nbytes + b.nbytes
