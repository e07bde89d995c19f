"""Per-token activation formulas of one decoder layer, one line each, with where they come from.

Notation (bytes per token unless stated): ``h`` hidden size, ``H``/``Hkv`` query/KV heads, ``D`` head dim,
``I`` MLP width, ``V`` vocabulary, ``cb`` bytes of the compute dtype (2 for bf16/fp16 autocast or half
parameters, 4 for fp32), ``rb`` bytes of the residual stream (the parameters' dtype: 4 under autocast with fp32
master weights, else ``cb``).

Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1
(``s b h (34 + 5 a s / h)`` bytes per layer for GPT with fp16 and materialized attention scores), re-derived
for what a transformers Llama-family layer (RMSNorm, RoPE, SwiGLU, SDPA) really saves for backward:

* RMSNorm (``x.float(); x * rsqrt(mean(x^2)); w * x.to(dtype)``) saves the fp32 input (4h), the
  normalized input in the input dtype (rb h) and its output, which the next Linear saves (cb h), or, under
  autocast, one cast copy per consuming Linear (2 h each: q/k/v = 3, gate/up = 2), since autocast casts
  activations on every call and caches only casts of leaf weights.
* attention: RoPE'd q and k, v (cb (H D + 2 Hkv D)) and the SDPA output (cb H D, also the o_proj input),
  plus the fp32 log-sum-exp of flash/memory-efficient attention (4 H). The ``5 a s^2`` score term of
  Korthikanti is gone: flash attention (Dao et al. 2022) recomputes the scores in backward.
* SwiGLU MLP: gate, silu(gate), up and their product (4 cb I); a GELU MLP saves fc and gelu(fc) (2 cb I).
* residual adds save nothing; under autocast their fp32 outputs are the next RMSNorm's fp32 input.
"""

from __future__ import annotations

from .shapes import LayerShape


def norm_saved(h: int, rb: int, cb: int, consumers: int, autocast: bool) -> int:
    """RMSNorm: fp32 input + normalized input + output (or one autocast cast per consuming Linear)."""
    out = consumers * 2 * h if autocast else cb * h
    return 4 * h + rb * h + out


def layer_saved(L: LayerShape, h: int, rb: int, cb: int, autocast: bool, gated: bool = True) -> int:
    """Bytes per token one decoder layer keeps for backward (no checkpointing)."""
    norms = norm_saved(h, rb, cb, 3, autocast) + norm_saved(h, rb, cb, 2 if gated else 1, autocast)
    attn = cb * (2 * L.heads * L.head_dim + 2 * L.kv_heads * L.head_dim) + 4 * L.heads
    mlp = (4 if gated else 2) * cb * L.intermediate
    return norms + attn + mlp


def layer_saved_attention_part(L: LayerShape, h: int, rb: int, cb: int, autocast: bool) -> int:
    """The part of :func:`layer_saved` still alive when backward reaches the attention block."""
    return norm_saved(h, rb, cb, 3, autocast) + cb * (2 * L.heads * L.head_dim + 2 * L.kv_heads * L.head_dim) + 4 * L.heads


def mlp_backward_transient(L: LayerShape, h: int, rb: int, cb: int) -> int:
    """Beyond the layer's saved tensors, at the peak of SwiGLU backward: d(output) (rb h, alive until the
    residual branch's grad is summed), d(silu) and d(up) (2 cb I; d(product) replaces the freed product)
    and one hidden-sized temporary (cb h). Checked against a CPU allocation trace."""
    return rb * h + 2 * cb * L.intermediate + cb * h


def attention_backward_transient(L: LayerShape, h: int, rb: int, cb: int, flash: bool = True) -> int:
    """Flash-attention backward (FlashAttention-2): fp32 dq accumulator (4 H D), dq/dk/dv (cb (H D + 2 Hkv D)),
    GQA dk/dv expanded to all query heads before the head sum (2 cb H D when Hkv < H), softmax_d (4 H),
    plus d(output) (rb h) and d(attn out) (cb H D)."""
    gqa = 2 * cb * L.heads * L.head_dim if L.kv_heads < L.heads else 0
    return (rb * h + cb * L.heads * L.head_dim + (4 * L.heads * L.head_dim if flash else 0)
            + cb * (L.heads * L.head_dim + 2 * L.kv_heads * L.head_dim) + gqa + 4 * L.heads)


def inference_layer_transient(L: LayerShape, h: int, cb: int) -> int:
    """Peak of one layer's forward without autograd (prefill), beyond the residual stream:
    RMSNorm 8 h (fp32 copy + x^2 / normalized fp32 + output) when cb < 4, else 8 h (normalized + output);
    attention normed input + q with its RoPE temporaries (4 cb H D) + k, v (2 cb Hkv D) + SDPA output and lse;
    MLP the attention block's residual sum and normed input (2 cb h) + silu(gate), up and their product (3 cb I)."""
    norm = 8 * h
    attn = cb * h + 4 * cb * L.heads * L.head_dim + 2 * cb * L.kv_heads * L.head_dim + 4 * L.heads
    mlp = 2 * cb * h + 3 * cb * L.intermediate
    return max(norm, attn, mlp)
