"""Decode attention over the full-precision static cache (:mod:`openautoglm.kv.kernels.dense_decode`).

The Triton kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, a subprocess) on fresh random
inputs against the masked SDPA it replaces (float32 reference on the same rounded inputs): GQA groups 1, 4
and 7 (padded to 16 rows), batch 1 and 3, query positions on and around chunk edges, one split, many
splits (most of them past ``pos``) and a split count that is not a power of two; the split-K tickets are
left at zero. The Generator's decode step takes the kernel and gives the same tokens. On the CPU without
the interpreter the op is the SDPA call itself, and compiles with ``fullgraph=True``. The kernel compiles
for the H100 (sm_90) with no register spills and its tile loads pipelined.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_interpreted, sm90_tool

from openautoglm.kv.kernels import dense_decode as dd

KERNEL_SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from openautoglm.kv.kernels import dense_decode as dd
    from openautoglm._util.scratch import tickets
    torch.manual_seed(0)
    L = 256
    # one split (the CPU counts one multiprocessor); 3 to 8 splits of 96 to 32 keys (most past small pos);
    # 3 splits of 96 keys (a split count that is not a power of two)
    cfgs = [None, dict(per_sm=16, block_n=32), dict(per_sm=64, max_split=3, block_n=32)]
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of the largest output
    i = 0
    for B in (1, 3):
        for j, (H, Hkv, D) in enumerate(((4, 4, 32), (8, 2, 64), (14, 2, 64))):
            dt = (torch.bfloat16, torch.float32, torch.float16)[(j + B) % 3]
            q = torch.randn(B, H, 1, D).to(dt)
            k = (torch.randn(B, Hkv, L, D) * 2).to(dt)
            v = torch.randn(B, Hkv, L, D).to(dt)
            for p in (0, 5, 63, 64, 200, 255):
                cfg = cfgs[i % 3]
                i += 1
                pos = torch.tensor([p])
                ref = dd.decode_reference(q.float(), k.float(), v.float(), pos, D ** -0.5)
                got = dd.decode_triton(q, k, v, pos, D ** -0.5, cfg)
                assert got.shape == q.shape and got.dtype == dt
                err = float((got.float() - ref).abs().max() / ref.abs().max())
                cos = float(F.cosine_similarity(got.float().flatten(), ref.flatten(), 0))
                # (bf16: the probabilities are rounded to bf16 for the tensor-core P @ V, as flash attention does;
                # the message shows the error of the masked SDPA in the same dtype beside it)
                sdpa = float((dd.decode_reference(q, k, v, pos, D ** -0.5).float() - ref).abs().max() / ref.abs().max())
                assert err < tol[dt] and cos > 0.99995, (B, H, Hkv, D, p, dt, cfg, err, cos, sdpa)
                assert int(tickets(q.device, B * Hkv)[:B * Hkv].abs().sum()) == 0
""")

# the Generator's decode step calls the kernel for every layer and step and gives the SDPA step's tokens
GENERATOR_SCRIPT = textwrap.dedent("""
    import transformers as tf
    import openautoglm.generation.generator as G
    from openautoglm.kv.kernels import dense_decode as dd
    calls = []
    kernel = dd.decode_triton
    dd.decode_triton = lambda *a, **k: (calls.append(a[0].shape), kernel(*a, **k))[1]
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)).eval()
    ids = torch.randint(0, 256, (2, 7))
    got = G.Generator(m).generate(ids, max_new_tokens=6).tokens
    assert len(calls) == 5 * 2 and calls[0] == (2, 4, 1, 32), calls  # every decode step of both layers
    import os
    os.environ["OPENAUTOGLM_DENSE_DECODE"] = "0"  # read when a Generator is built
    assert torch.equal(G.Generator(m).generate(ids, max_new_tokens=6).tokens, got) and len(calls) == 10
    print("OK")
""")


def test_dense_decode_kernel_and_generator_in_interpreter():
    run_interpreted(KERNEL_SCRIPT + GENERATOR_SCRIPT)  # one interpreter process


def test_op_on_cpu_is_the_masked_sdpa_and_compiles():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 32), torch.randn(2, 3, 40, 32), torch.randn(2, 3, 40, 32)
    pos = torch.tensor([17])
    want = dd.decode_reference(q, k, v, pos, 0.2)
    assert torch.equal(dd.decode_attention(q, k, v, pos, 0.2), want)
    sub = torch.nn.functional.scaled_dot_product_attention(q[:, :, :, :], k[:, :, :18].repeat_interleave(2, 1),
                                                           v[:, :, :18].repeat_interleave(2, 1), scale=0.2)
    assert torch.allclose(want, sub, atol=1e-6)
    fn = torch.compile(lambda *a: dd.decode_attention(*a) * 2, fullgraph=True, backend="eager")
    assert torch.allclose(fn(q, k, v, pos, 0.2), 2 * want)
    assert not dd.kernel_supports(q, k, v) or dd.INTERPRET  # CPU: the SDPA path


def test_bad_inputs_are_value_errors():
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 16, 32)
    with pytest.raises(ValueError, match="one query token"):
        dd.decode_attention(torch.randn(1, 4, 2, 32), k, k, torch.tensor([3]))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        dd.decode_attention(torch.randn(1, 3, 1, 32), k, k, torch.tensor([3]))
    with pytest.raises(ValueError, match="k_cache / v_cache"):
        dd.decode_attention(q, k, torch.randn(1, 2, 8, 32), torch.tensor([3]))
    with pytest.raises(ValueError, match="pos"):
        dd.decode_attention(q, k, k, torch.tensor([3.0]))


def test_split_plan_is_static_and_fills_the_gpu():
    dev = torch.device("cpu")
    for L, bh, d in ((512, 32, 128), (4096, 32, 128), (256, 8, 64), (1000, 3, 256), (64, 256, 128)):
        bn, chunk, n = dd.split_plan(L, bh, d, dev, dict(per_sm=264))  # 132 SMs x 2
        assert chunk % bn == 0 and (n - 1) * chunk < L <= n * chunk and n <= dd.DENSE_CONFIG["max_split"]
        assert bn == (32 if d == 256 else 64)
    assert dd.split_plan(4096, 32, 128, dev, dict(per_sm=264))[2] == 8  # 256 programs on 132 SMs
    assert dd.split_plan(512, 32, 128, dev, dict(per_sm=264))[1:] == (64, 8)


def test_dense_decode_kernel_compiles_for_sm90():
    """sm_90 cubins through Triton's own ptxas (no GPU): 7B (head_dim 128, group 1), 1B-shaped (64, group 8),
    Qwen-like (128, group 7) and head_dim 256; no spills, at most 128 registers (4 programs of 4 warps per SM),
    the K/V tiles loaded with cp.async (Triton's loop pipelining) and the MMAs on tensor cores."""
    kr = sm90_tool()
    from openautoglm.kv.kernels import triton_dense

    ptrs = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    ptrs.update(pos_ptr="*i64", po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", ticket_ptr="*i32", qk_scale="fp32")
    cfg = dd.DENSE_CONFIG
    for d, hkv, grp, splits in ((128, 32, 1, 8), (64, 4, 8, 8), (128, 4, 7, 8), (256, 8, 1, 4)):
        bn = cfg["block_n"] if d <= 128 else cfg["block_n_256"]
        const = dict(HKV=hkv, GRP=grp, BLOCK_H=16, D=d, BLOCK_N=bn, BLOCK_S=splits, UPCAST=False)
        cubin = kr.compile_sm90(triton_dense.dense_decode_kernel, const, ptrs, cfg["num_warps"], cfg["num_stages"])
        regs, stack = kr.registers(cubin)
        sass = kr.cuobjdump(cubin, "-sass")
        assert regs <= 128 and stack == 0, (d, grp, regs, stack)
        assert "LDGSTS" in sass and "HMMA" in sass, (d, grp)
