"""Per-token activation formulas of one decoder layer, one line each, with where they come from.

Notation (bytes per token unless stated): ``h`` hidden size, ``H``/``Hkv`` query/KV heads, ``D`` head dim,
``I`` MLP width, ``V`` vocabulary, ``cb`` bytes of the compute dtype (2 for bf16/fp16 autocast or half
parameters, 4 for fp32), ``rb`` bytes of the residual stream (the parameters' dtype: 4 under autocast with fp32
master weights, else ``cb``).

Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1
(``s b h (34 + 5 a s / h)`` bytes per layer for GPT with fp16 and materialized attention scores), re-derived
for what a transformers Llama-family layer (RMSNorm, RoPE, SwiGLU, SDPA) really saves for backward:

* RMSNorm (``x.float(); x * rsqrt(mean(x^2)); w * x.to(dtype)``) saves the fp32 input (4h), the
  normalized input in the input dtype (rb h; Gemma keeps it in fp32: 4h) and its output, which the next Linear
  saves (cb h), or, under autocast, one cast copy per consuming Linear (2 h each: q/k/v = 3, gate/up = 2), since
  autocast casts activations on every call and caches only casts of leaf weights. LayerNorm saves its input
  and output only.
* attention: RoPE'd q and k, v (cb (H D + 2 Hkv D)) and the SDPA output (cb H D, also the o_proj input),
  plus the fp32 log-sum-exp of flash/memory-efficient attention (4 H). The ``5 a s^2`` score term of
  Korthikanti is gone: flash attention (Dao et al. 2022) recomputes the scores in backward. A fused qkv
  projection keeps its whole output alive (q/k/v are views of it); Qwen3's per-head q/k RMSNorm adds
  (4 + cb) (H + Hkv) D.
* SwiGLU MLP: gate, silu(gate), up and their product (4 cb I); a GELU MLP saves fc and gelu(fc) (2 cb I), plus
  the intermediates of a Python-formula GELU (``gelu_new``: 3 cb I).
* dropout with p > 0 saves a 1-byte mask per element (embeddings, attention and MLP residual branches).
* residual adds save nothing; under autocast their fp32 outputs are the next RMSNorm's fp32 input.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: query heads, KV heads, head dim, MLP width (after any pruning)."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


@dataclass(frozen=True)
class Arch:
    """What differs between the supported families (defaults: Llama/Mistral/Qwen2)."""

    norm: str = "rms"              # rms | rms_fp32 (Gemma: normalized kept fp32) | layer (LayerNorm)
    rotary: bool = True
    fused_qkv: bool = False        # Phi-3 qkv_proj, GPT-2 c_attn
    fused_gate_up: bool = False    # Phi-3 gate_up_proj
    qk_norm: bool = False          # Qwen3 per-head RMSNorm on q and k
    gated_mlp: bool = True
    act_extra: int = 0             # extra I-sized tensors a Python-formula activation saves (gelu_new: 3)
    dropout: bool = False          # any dropout p > 0 (1-byte masks in training)


LLAMA = Arch()


def norm_saved(h: int, rb: int, cb: int, consumers: int, autocast: bool, arch: Arch = LLAMA) -> int:
    """A norm: its saved input and normalized input, plus its output (or one autocast cast per consuming Linear)."""
    out = consumers * 2 * h if autocast else cb * h
    if arch.norm == "layer":
        return rb * h + out
    return 4 * h + (4 if arch.norm == "rms_fp32" else rb) * h + out


def attention_saved(L: LayerShape, cb: int, arch: Arch = LLAMA) -> int:
    """q/k after RoPE, v (or the whole fused qkv output), SDPA output, fp32 log-sum-exp, q/k norms."""
    HD, KD = L.heads * L.head_dim, L.kv_heads * L.head_dim
    qkv = cb * (HD + 2 * KD) if arch.fused_qkv else cb * KD + (0 if arch.rotary else cb * (HD + KD))
    rope = cb * (HD + KD) if arch.rotary else 0
    qk_norm = (4 + cb) * (HD + KD) if arch.qk_norm else 0
    return qkv + rope + cb * HD + 4 * L.heads + qk_norm


def mlp_saved(L: LayerShape, cb: int, arch: Arch = LLAMA) -> int:
    return (4 if arch.gated_mlp else 2 + arch.act_extra) * cb * L.intermediate


def layer_saved(L: LayerShape, h: int, rb: int, cb: int, autocast: bool, arch: Arch = LLAMA) -> int:
    """Bytes per token one decoder layer keeps for backward (no checkpointing)."""
    qkv_consumers = 1 if arch.fused_qkv else 3
    mlp_consumers = 1 if (arch.fused_gate_up or not arch.gated_mlp) else 2
    norms = norm_saved(h, rb, cb, qkv_consumers, autocast, arch) + norm_saved(h, rb, cb, mlp_consumers, autocast, arch)
    masks = 2 * h if arch.dropout else 0
    return norms + attention_saved(L, cb, arch) + mlp_saved(L, cb, arch) + masks


def layer_saved_attention_part(L: LayerShape, h: int, rb: int, cb: int, autocast: bool, arch: Arch = LLAMA) -> int:
    """The part of :func:`layer_saved` still alive when backward reaches the attention block."""
    return norm_saved(h, rb, cb, 1 if arch.fused_qkv else 3, autocast, arch) + attention_saved(L, cb, arch)


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


def inference_layer_transient(L: LayerShape, h: int, cb: int, arch: Arch = LLAMA) -> int:
    """Peak of one layer's forward without autograd (prefill), beyond the residual stream:
    RMSNorm 8 h (fp32 copy + x^2 / normalized fp32 + output) when cb < 4, else 8 h (normalized + output);
    attention normed input + q with its RoPE temporaries (4 cb H D) + k, v (2 cb Hkv D) + SDPA output and lse;
    MLP the attention block's residual sum and normed input (2 cb h) + silu(gate), up and their product (3 cb I;
    4 cb I with a fused gate_up output, fc + GELU temporaries for a GELU MLP)."""
    HD, KD = L.heads * L.head_dim, L.kv_heads * L.head_dim
    norm = 8 * h
    fused = cb * (HD + 2 * KD) if arch.fused_qkv else 0
    attn = cb * h + (4 if arch.rotary else 1) * cb * HD + 2 * cb * KD + 4 * L.heads + fused
    if arch.gated_mlp:
        width = 4 if arch.fused_gate_up else 3
    else:
        width = 2 + (2 if arch.act_extra else 0)
    mlp = 2 * cb * h + width * cb * L.intermediate
    return max(norm, attn, mlp)
