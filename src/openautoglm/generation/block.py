"""One Llama-family decoder block, step by step, shared by the compiled decode paths.

:class:`~.generator.Generator` (full-precision static cache) and :mod:`.kv_decode` (quantized KV store) run
the same block around different attention: :func:`qkv` (norm, projections, Qwen3's q/k norms, rotary),
then the caller's attention and cache write, then :func:`finish` (output projection, residual, MLP).
Quantized q/k/v and gate/up projections run as one kernel launch at batch 1 and one GEMM at prefill
(:func:`openautoglm.quant.kernels.fused_linears`).
"""

from __future__ import annotations

from torch import nn

from .. import _hf
from ..quant.kernels import fused_linears


def qkv(layer: nn.Module, h, cos, sin, rope):
    """``h (B, T, hidden)`` -> ``q (B, Hq, T, D)``, ``k, v (B, Hkv, T, D)``, rotary applied to q and k.

    q/k RMSNorms per head (Qwen3, Qwen3-MoE) or over the whole projection before the heads are split (OLMoE), and
    OLMoE's optional ``clip_qkv`` clamp, as the families' own attention modules apply them."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, t, _ = x.shape
    hd = attn.head_dim
    out = fused_linears(x, (attn.q_proj, attn.k_proj, attn.v_proj))  # quantized: one launch / one GEMM
    if out is None:
        out = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    q, k, v = out
    norm = _hf.qk_norm_kind(attn)
    if norm == "full":  # OLMoE
        q, k = attn.q_norm(q), attn.k_norm(k)
    clip = _hf.clip_qkv(attn)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k, v = (y.view(b, t, -1, hd) for y in (q, k, v))
    if norm == "head":  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v.transpose(1, 2)


def finish(layer: nn.Module, h, o):
    """``o (B, T, H, D)`` attention output -> the layer's output hidden states ``(B, T, hidden)``."""
    b, t = o.shape[:2]
    h = h + layer.self_attn.o_proj(o.reshape(b, t, -1))
    return h + mlp(layer.mlp, layer.post_attention_layernorm(h))


def mlp(module: nn.Module, x):
    """The gated MLP; gate and up in one launch at batch 1 (one GEMM at prefill) when they are quantized. A
    mixture-of-experts block (router, routed experts, shared experts) runs its own forward: its experts are
    transformers' (float) or :class:`~openautoglm.quant.experts.QuantExperts`, both traceable without graph breaks."""
    if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        gu = fused_linears(x, (module.gate_proj, module.up_proj))
        if gu is not None:
            return module.down_proj(module.act_fn(gu[0]) * gu[1])
    return module(x)
