"""The compiled decode helper and ``model.generate`` routing on the mixture-of-experts families.

Mixtral, Qwen3-MoE, OLMoE and Qwen2-MoE run in :class:`Generator` (their attention as the dense families'; the MoE block
-- router, routed experts, shared experts -- in place of the MLP step): routed tokens equal transformers' greedy output,
float and quantized. The step traces with ``fullgraph=True`` (float experts through transformers' grouped path,
quantized experts through the expert kernels' custom ops, checked in Triton's interpreter). DeepSeek-V3 (MLA) and
GPT-OSS (attention sinks) fall back to transformers' generate, logging why.
"""

from __future__ import annotations

import logging
import textwrap

import pytest
import torch
from conftest import make_tiny, run_interpreted

import openautoglm.generation.generator as G
from openautoglm import QuantConfig, enable_fast_generate, quantize
from openautoglm.generation.generator import Generator
from openautoglm.generation.routing import routed

RUN = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"]


def _ids(b=2, t=7, seed=0):
    return torch.randint(2, 8192, (b, t), generator=torch.Generator().manual_seed(seed))


def _hf(m, ids, n):
    return type(m).generate(m, ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=1)


@pytest.mark.parametrize("family", RUN)
@pytest.mark.parametrize("scheme", [None, "w4"])
def test_moe_greedy_tokens_match_transformers(family, scheme):
    m = make_tiny(family)
    if scheme:
        quantize(m, QuantConfig(scheme=scheme))
    ids = _ids()
    assert torch.equal(Generator(m).generate(ids, max_new_tokens=8).tokens, _hf(m, ids, 8))


def test_olmoe_clip_qkv_and_whole_width_qk_norm():
    m = make_tiny("olmoe", clip_qkv=0.05)  # tight enough to clamp
    ids = _ids(1)
    assert torch.equal(Generator(m).generate(ids, max_new_tokens=6).tokens, _hf(m, ids, 6))


def test_float_moe_decode_step_traces_fullgraph():
    torch._dynamo.reset()
    m = make_tiny("qwen3_moe")
    gen = Generator(m, compile=False)
    gen._dec = torch.compile(G._layer_decode, fullgraph=True, dynamic=False, backend="eager")
    ids = _ids(1)
    assert torch.equal(gen.generate(ids, max_new_tokens=5).tokens, _hf(m, ids, 5))


@pytest.mark.parametrize("family,why", [("deepseek_v3", "multi-head latent attention"), ("gpt_oss", "attention sinks")])
def test_routing_falls_back_with_the_reason(family, why, caplog):
    m = enable_fast_generate(make_tiny(family), allow_cpu=True)
    ids = _ids(1)
    with caplog.at_level(logging.INFO, logger="openautoglm.generation.routing"):
        out = m.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=1)
    assert routed(m).counts == {"fast": 0, "transformers": 1}
    assert any(why in r.getMessage() for r in caplog.records)
    ref = type(m).generate(m, ids, max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=1)
    assert torch.equal(out, ref)


def test_routing_runs_quantized_moe_in_the_compiled_decode():
    m = make_tiny("mixtral")
    quantize(m, QuantConfig(scheme="w8"))
    enable_fast_generate(m, allow_cpu=True)
    ids = _ids(1)
    out = m.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=1)
    assert routed(m).counts == {"fast": 1, "transformers": 0}
    assert torch.equal(out, _hf(m, ids, 6))


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from conftest import make_tiny
    from openautoglm import QuantConfig, quantize
    from openautoglm.generation import block
    from openautoglm.quant.kernels import moe
    for family in ("mixtral", "qwen2_moe"):
        m = make_tiny(family, dtype=torch.float16)
        quantize(m, QuantConfig(scheme="w4"))
        layer = m.model.layers[1]
        step = lambda x: block.mlp(layer.mlp, x)
        for t in (1, 20):  # decode (grouped GEMV) and prefill (sorted pairs, grouped GEMM)
            x = torch.randn(1, t, 128).half()
            ref = step(x).float()                   # CPU: the reference loop over the routed experts
            moe.fast_ok = lambda mod, x: True        # the CUDA paths, their kernels in the interpreter
            torch._dynamo.reset()
            out = torch.compile(step, fullgraph=True, backend="eager")(x).float()
            moe.fast_ok = lambda mod, x: False
            err = float((out - ref).norm() / ref.norm())
            assert err < 1e-2, (family, t, err)
    print("OK")
""")


def test_quantized_moe_block_traces_fullgraph_in_interpreter():
    """Router, the expert kernels' custom ops and the shared expert trace as one graph (decode and prefill)."""
    run_interpreted(SCRIPT)
