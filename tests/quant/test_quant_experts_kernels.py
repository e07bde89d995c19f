"""The quantized experts' Triton paths (:mod:`openautoglm.quant.kernels.moe`, :mod:`~.ops_moe`) in Triton's CPU
interpreter (a subprocess with ``TRITON_INTERPRET=1``), against the float computation on the dequantized weights.

Decode: the grouped GEMV over (token, expert) pairs (the decode kernel's ``EXPERTS`` mode: expert ids read on the
device), w4 k32 asymmetric and symmetric, w8 grouped, w8a8 int8 and e4m3 per channel, Mixtral's concatenated gate/up
and GPT-OSS's interleaved gate/up with biases, eager and traced by dynamo with ``fullgraph=True``. Prefill: pairs sorted
by expert, the stack dequantized (Triton), one GEMM per expert, and ``torch._grouped_mm`` where torch has it on the
CPU. fp16 operands (the interpreter's bf16 dot is not exact); an expert no token was routed to holds NaN scales, so
reading it would show.
"""

from __future__ import annotations

import textwrap

from conftest import run_interpreted

SCRIPT = textwrap.dedent("""
    import torch
    from transformers import GptOssConfig, MixtralConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from openautoglm.quant import QuantConfig
    from openautoglm.quant.experts import QuantExperts
    from openautoglm.quant.kernels import moe, ops_moe
    seed = torch.seed()
    print("seed", seed)
    H, I, E, K_TOP = 256, 128, 4, 2

    def experts(kind):
        if kind == "mixtral":
            m = MixtralExperts(MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E))
        else:
            m = GptOssExperts(GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E))
            torch.nn.init.normal_(m.gate_up_proj_bias, std=0.1)
            torch.nn.init.normal_(m.down_proj_bias, std=0.1)
        for p in (m.gate_up_proj, m.down_proj):
            torch.nn.init.normal_(p, std=0.05)
        return m.half().requires_grad_(False)

    def ref(q, x, idx, w):
        # float computation on the dequantized stacks: what every path must compute
        up = q.gate_up.dequantized_weight().view(E, q.up_rows, H)
        dn = q.down.dequantized_weight().view(E, H, I)
        bu = None if q.gate_up.bias is None else q.gate_up.bias.float().view(E, -1)
        bd = None if q.down.bias is None else q.down.bias.float().view(E, -1)
        out = torch.zeros(x.shape[0], H)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                h = x[t].float() @ up[e].t() + (0 if bu is None else bu[e])
                h = q.apply_gate(h[None])[0]
                out[t] += (h @ dn[e].t() + (0 if bd is None else bd[e])) * float(w[t, j])
        return out

    def routing(T):
        idx = torch.stack([torch.randperm(E)[:K_TOP] for _ in range(T)])
        return idx, torch.softmax(torch.randn(T, K_TOP), -1).half()

    def rel(y, r):
        assert not torch.isnan(y).any()
        return float((y.float() - r).norm() / r.norm())

    cfgs = [QuantConfig(scheme="w4"), QuantConfig(scheme="w4", symmetric=True), QuantConfig(scheme="w8", group_size=64),
            QuantConfig(scheme="w8a8"), QuantConfig(scheme="w8a8-fp8")]
    for kind in ("mixtral", "gpt_oss"):
        src = experts(kind)
        for cfg in cfgs:
            q = QuantExperts.from_experts(src, cfg)
            assert moe.operands(q.gate_up) is not None and moe.operands(q.down) is not None
            x = torch.randn(3, H).half()
            idx, w = routing(3)
            r = ref(q, x, idx, w)
            e = rel(moe.decode(q, x, idx, w), r)
            assert e < 5e-3, (kind, cfg.scheme, "decode", e)
            if cfg.scheme == "w4" and cfg.symmetric is False:
                traced = torch.compile(moe.decode, fullgraph=True, backend="eager")
                assert rel(traced(q, x, idx, w), r) < 5e-3
            x = torch.randn(20, H).half()
            idx, w = routing(20)
            r = ref(q, x, idx, w)
            for mode in ("loop", "grouped"):
                ops_moe.GROUPED_MM = mode
                try:
                    y = moe.prefill(q, x, idx, w)
                except (RuntimeError, NotImplementedError) as err:  # no CPU fp16 _grouped_mm in this torch
                    assert mode == "grouped", err
                    print("grouped_mm unavailable on CPU:", str(err).splitlines()[0])
                    continue
                e = rel(y, r)
                assert e < 5e-3, (kind, cfg.scheme, "prefill", mode, e)
            print(kind, cfg.scheme, "ok")
    # only the routed experts' codes are read: NaN codes in an expert no token was routed to change nothing
    q = QuantExperts.from_experts(experts("mixtral"), QuantConfig(scheme="w8"))
    x = torch.randn(2, H).half()
    idx = torch.tensor([[0, 1], [1, 0]])
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).half()
    before = moe.decode(q, x, idx, w)
    q.gate_up.scale.data.view(-1, E, q.up_rows)[:, 3] = float("nan")
    q.down.scale.data.view(-1, E, H)[:, 2] = float("nan")
    assert torch.equal(moe.decode(q, x, idx, w), before)
    # asymmetric w4 with one group per row (in_features == group_size, as the down projections above): the decode
    # kernel reads the zero points on its grouped path (it used to drop them on the per-row path)
    from openautoglm.quant.kernels import ops
    from openautoglm.quant.linear import LINEAR_CLASSES
    lin = LINEAR_CLASSES["w4"].from_linear(torch.nn.Linear(128, 64, bias=False).half(), QuantConfig(scheme="w4"))
    x = torch.randn(1, 128).half()
    y = ops.wq_gemv(x, *lin.decode_operands())
    assert rel(y, x.float() @ lin.dequantized_weight().t()) < 5e-3
    print("OK")
""")


def test_expert_kernels_in_interpreter():
    run_interpreted(SCRIPT)
