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
class MoEShape:
    """The mixture-of-experts block of a layer: ``experts`` routed experts, ``top_k`` per token, each with an
    ``up``-row first projection (2I gated) and width ``intermediate``; ``shared`` width of the shared-expert MLP (0:
    none); routing weights in float32 or the hidden dtype; per-expert biases; I-sized gate temporaries."""

    experts: int
    top_k: int
    up: int
    intermediate: int
    shared: int = 0
    weights_fp32: bool = False
    bias: bool = False
    gate_tmp: int = 2
    quantized: str = ""              # scheme of openautoglm's quantized experts ("": transformers' float experts)


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: query heads, KV heads, head dim, MLP width (after any pruning); ``moe`` for a
    mixture-of-experts layer (``intermediate`` is then 0: no dense MLP); ``cache`` = (heads, key width, value width)
    of what the KV cache holds when it is not ``kv_heads`` x ``head_dim`` for both (MLA caches its latent: one
    "head", ``kv_lora_rank`` wide for keys and ``qk_rope_head_dim`` for values); ``window`` of a sliding-window
    layer (0: full attention)."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    moe: MoEShape | None = None
    cache: tuple[int, int, int] | None = None
    window: int = 0

    def kv_elements(self) -> int:
        """K and V elements cached per token (one sequence)."""
        if self.cache is not None:
            n, k, v = self.cache
            return n * (k + v)
        return 2 * self.kv_heads * self.head_dim


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
    eager_scores: int = 0          # eager attention: (tokens x keys) score tensors per head alive at once (0: SDPA)


LLAMA = Arch()


def norm_saved(h: int, rb: int, cb: int, consumers: int, autocast: bool, arch: Arch = LLAMA) -> int:
    """A norm: its saved input and normalized input, plus its output (or one autocast cast per consuming Linear)."""
    out = consumers * 2 * h if autocast else cb * h
    if arch.norm == "layer":
        return rb * h + out
    return 4 * h + (4 if arch.norm == "rms_fp32" else rb) * h + out


def attention_saved(L: LayerShape, cb: int, arch: Arch = LLAMA, seq: int = 0) -> int:
    """q/k after RoPE, v (or the whole fused qkv output), SDPA output, fp32 log-sum-exp, q/k norms."""
    HD, KD = L.heads * L.head_dim, L.kv_heads * L.head_dim
    qkv = cb * (HD + 2 * KD) if arch.fused_qkv else cb * KD + (0 if arch.rotary else cb * (HD + KD))
    rope = cb * (HD + KD) if arch.rotary else 0
    qk_norm = (4 + cb) * (HD + KD) if arch.qk_norm else 0
    # eager attention (GPT-OSS) keeps its softmax output (seq + 1 sink logits per head) and K/V repeated per head
    eager = (cb * L.heads * (seq + 1) + (2 * cb * HD if L.kv_heads < L.heads else 0)) if arch.eager_scores else 0
    return qkv + rope + cb * HD + 4 * L.heads + qk_norm + eager


def mlp_saved(L: LayerShape, cb: int, arch: Arch = LLAMA, h: int = 0) -> int:
    """A dense MLP's saved activations per token, or a MoE block's (:func:`moe_saved_per_token`, needs ``h``)."""
    if L.moe is not None:
        return moe_saved_per_token(L.moe, cb, h)
    return (4 if arch.gated_mlp else 2 + arch.act_extra) * cb * L.intermediate


# ----------------------------------------------------------------------------- mixture of experts
# transformers' default experts path ("grouped_mm", integrations/moe.py) on T tokens routed to k experts each,
# S = T k (token, expert) pairs: the pairs sorted by expert (ids, permutation, inverse: 3 x int64), the tokens gathered
# (xg: S x h), the grouped up projection (S x up), the gated activation (gate_tmp tensors of S x I alive at its peak),
# the grouped down projection (S x h), weighted by the routing weights (float32 for Mixtral / DeepSeek: S x h in
# float32, and again when put back in token order), summed over each token's k pairs. Measured per token with a CPU
# allocation trace of each family's block (tests/memory/test_estimate_moe.py).

def moe_pair_transient(M: MoEShape, h: int, cb: int) -> int:
    """Peak bytes per (token, expert) pair inside the experts at inference: the up side (xg, up output -- and its
    gathered bias --, gate temporaries) or the down side (xg, down output -- and bias --, weighted and re-ordered)."""
    wb = 4 if M.weights_fp32 else cb
    up = cb * (h + M.up * (2 if M.bias else 1) + M.gate_tmp * M.intermediate)
    down = cb * h * (3 if M.bias else 2) + 2 * wb * h
    return max(up, down) + 32


def moe_loop_transient(M: MoEShape, h: int, cb: int) -> int:
    """Per token, quantized experts on the CPU (the reference loop of ``quant/kernels/moe.py``, expert by expert):
    the output (cb h) and the one-hot routing mask (8 (E + 1) k) for all tokens; the busiest expert's share of them
    (1.2 k / E) runs its chain: its tokens, the up output (w8a8: int8 input, int32 accumulator and two float32
    rescales, 12 B per output), the gate temporaries, the down output weighted (float32 weights: 2 x 4 h).
    The weight each expert dequantizes is the ``workspace`` term."""
    wb = 4 if M.weights_fp32 else cb
    lin = 12 if M.quantized in ("w8a8", "static") else cb
    share = min(1.0, 1.2 * M.top_k / M.experts)
    chain = cb * h + max(lin * M.up + (h if lin == 12 else 0),
                         cb * M.up * (2 if M.bias else 1) + M.gate_tmp * cb * M.intermediate,
                         cb * M.intermediate + lin * h + 2 * wb * h)
    return cb * h + 8 * (M.experts + 1) * M.top_k + 4 * M.experts + int(share * chain)


def moe_inference_transient(M: MoEShape, h: int, cb: int, cuda: bool = True) -> int:
    """Per token, the block's peak beyond its input: k pairs, the router (logits and float32 probabilities over the
    experts); a shared expert's output alive meanwhile, or its own MLP transient (3 cb Is) with the experts' output.
    Quantized experts on CUDA take the same grouped path (sorted pairs, grouped GEMMs); on the CPU their reference
    loop (:func:`moe_loop_transient`)."""
    routed = (moe_loop_transient(M, h, cb) if M.quantized and not cuda
              else M.top_k * moe_pair_transient(M, h, cb)) + M.experts * (cb + 4)
    if not M.shared:
        return routed
    return max(routed + cb * h, 3 * cb * M.shared + cb * h)


def moe_saved_per_token(M: MoEShape, cb: int, h: int) -> int:
    """Bytes per token the MoE block keeps for backward: per pair xg, the up output, the gate's saved temporaries,
    the down output (cb (2h + up + gate_tmp I)) and 28 B of ids / weights; the router's float32 probabilities and
    top-k (4 E + 12 k); a shared expert as a gated MLP (4 cb Is)."""
    return (M.top_k * (cb * (2 * h + M.up + M.gate_tmp * M.intermediate) + 28) + 4 * M.experts + 12 * M.top_k
            + 4 * cb * M.shared)


def moe_backward_transient(M: MoEShape, h: int, rb: int, cb: int) -> int:
    """Beyond the saved tensors, at the peak of the experts' backward: d(output) (rb h) and per pair the gradients of
    the down input, the up output and the gathered input (cb (I + up + h))."""
    return rb * h + M.top_k * cb * (M.intermediate + M.up + h) + cb * h


def layer_saved(L: LayerShape, h: int, rb: int, cb: int, autocast: bool, arch: Arch = LLAMA, seq: int = 0) -> int:
    """Bytes per token one decoder layer keeps for backward (no checkpointing)."""
    qkv_consumers = 1 if arch.fused_qkv else 3
    mlp_consumers = 1 if (arch.fused_gate_up or not arch.gated_mlp) else 2
    norms = norm_saved(h, rb, cb, qkv_consumers, autocast, arch) + norm_saved(h, rb, cb, mlp_consumers, autocast, arch)
    masks = 2 * h if arch.dropout else 0
    return norms + attention_saved(L, cb, arch, seq) + mlp_saved(L, cb, arch, h) + masks


def layer_saved_attention_part(L: LayerShape, h: int, rb: int, cb: int, autocast: bool, arch: Arch = LLAMA,
                               seq: int = 0) -> int:
    """The part of :func:`layer_saved` still alive when backward reaches the attention block."""
    return norm_saved(h, rb, cb, 1 if arch.fused_qkv else 3, autocast, arch) + attention_saved(L, cb, arch, seq)


def mlp_backward_transient(L: LayerShape, h: int, rb: int, cb: int) -> int:
    """Beyond the layer's saved tensors, at the peak of SwiGLU backward: d(output) (rb h, alive until the
    residual branch's grad is summed), d(silu) and d(up) (2 cb I; d(product) replaces the freed product)
    and one hidden-sized temporary (cb h). Checked against a CPU allocation trace. A MoE block:
    :func:`moe_backward_transient`."""
    if L.moe is not None:
        return moe_backward_transient(L.moe, h, rb, cb)
    return rb * h + 2 * cb * L.intermediate + cb * h


def attention_backward_transient(L: LayerShape, h: int, rb: int, cb: int, flash: bool = True) -> int:
    """Flash-attention backward (FlashAttention-2): fp32 dq accumulator (4 H D), dq/dk/dv (cb (H D + 2 Hkv D)),
    GQA dk/dv expanded to all query heads before the head sum (2 cb H D when Hkv < H), softmax_d (4 H),
    plus d(output) (rb h) and d(attn out) (cb H D)."""
    gqa = 2 * cb * L.heads * L.head_dim if L.kv_heads < L.heads else 0
    return (rb * h + cb * L.heads * L.head_dim + (4 * L.heads * L.head_dim if flash else 0)
            + cb * (L.heads * L.head_dim + 2 * L.kv_heads * L.head_dim) + gqa + 4 * L.heads)


def inference_layer_transient(L: LayerShape, h: int, cb: int, arch: Arch = LLAMA, seq: int = 0,
                              cuda: bool = True) -> int:
    """Peak of one layer's forward without autograd (prefill), beyond the residual stream:
    RMSNorm 8 h (fp32 copy + x^2 / normalized fp32 + output) when cb < 4, else 8 h (normalized + output);
    attention normed input + q with its RoPE temporaries (4 cb H D) + k, v (2 cb Hkv D) + SDPA output and lse;
    MLP the attention block's residual sum and normed input (2 cb h) + silu(gate), up and their product (3 cb I;
    4 cb I with a fused gate_up output, fc + GELU temporaries for a GELU MLP), or a MoE block
    (:func:`moe_inference_transient`). Eager attention (GPT-OSS: no SDPA because of its sinks) materializes its
    scores: ``arch.eager_scores`` tensors of ``seq`` (+ 1 sink) logits per query head and token alive at once."""
    HD, KD = L.heads * L.head_dim, L.kv_heads * L.head_dim
    norm = 8 * h
    fused = cb * (HD + 2 * KD) if arch.fused_qkv else 0
    attn = cb * h + (4 if arch.rotary else 1) * cb * HD + 2 * cb * KD + 4 * L.heads + fused
    scores = arch.eager_scores * cb * L.heads * seq  # a sliding layer masks its scores, it does not shorten them
    if arch.eager_scores:  # eager also repeats K and V to every query head, and copies the output to (T, H D)
        scores += (2 * cb * HD if L.kv_heads < L.heads else 0) + cb * HD
    if arch.gated_mlp:
        width = 4 if arch.fused_gate_up else 3
    else:
        width = 2 + (2 if arch.act_extra else 0)
    mlp = 2 * cb * h + (moe_inference_transient(L.moe, h, cb, cuda) if L.moe is not None
                        else width * cb * L.intermediate)
    return max(norm, attn + scores, mlp)
