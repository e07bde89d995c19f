"""Byte counts the estimator is built from: dtypes, a model's stored tensors, KV caches, quantized weights.

Exact where the bytes exist (``model_bytes`` reads the tensors, wrapper subclasses through their inner tensors),
analytic where they do not (``kv_cache_bytes``, ``quantized_weight_bytes`` from a :class:`~.shapes.ModelShape`).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import _hf
from .._util.modules import model_bytes  # noqa: F401  (public here: openautoglm.memory.model_bytes)
from ..kv.layout import resolve_residual
from ..kv.packing import bytes_per_token
from .formulas import LayerShape
from .shapes import ModelShape

_KV_BITS = {"bf16": 16, "fp16": 16, "fp32": 32, "int8": 8, "int4": 4, "int2": 2, "fp8": 8}


def dtype_bytes(dtype: torch.dtype | str) -> float:
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8,
                 "fp8": torch.float8_e4m3fn}.get(dtype) or getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(config, tokens: int, batch: int = 1, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes of a full-precision KV cache holding ``tokens`` positions for ``batch`` sequences."""
    if tokens < 0 or batch < 1:
        raise ValueError(f"tokens={tokens} must be >= 0 and batch={batch} >= 1")
    per_token = 2 * _hf.num_layers(config) * _hf.num_kv_heads(config) * _hf.head_dim(config) * dtype_bytes(dtype)
    return int(per_token * tokens * batch)


def _quant_spec(quantization) -> dict | None:
    """Normalize ``quantization`` (None, "w4"/"int4"/"w8"/"int8", {"bits", "group_size", "symmetric"},
    a QuantConfig or a recorded transform) to {"bits", "group_size", "symmetric", "exclude_head"}."""
    if quantization is None:
        return None
    if isinstance(quantization, str):
        q = quantization.lower()
        table = {"w4": 4, "int4": 4, "w8": 8, "int8": 8, "w8a8": 8, "w8a8-fp8": 8, "fp8": 8}
        if q not in table:
            raise ValueError(f"unknown quantization {quantization!r}; accepted: {', '.join(table)} or a dict with bits/group_size")
        quantization = {"bits": table[q], "group_size": 128 if table[q] == 4 else None, "symmetric": table[q] != 4}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else dataclasses.asdict(quantization)
    q = dict(quantization.get("config", quantization))
    bits = q.get("bits") or {"w4": 4}.get(q.get("scheme"), 8 if q.get("scheme") else None)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"quantization bits={bits!r}; accepted: 2, 3, 4, 8")
    g = q.get("group_size")
    if g is not None and (not isinstance(g, int) or g < 1):
        raise ValueError(f"quantization group_size={g!r} must be a positive integer or None")
    return {"bits": bits, "group_size": g, "symmetric": q.get("symmetric", bits != 4),
            "exclude_head": "lm_head" in tuple(q.get("exclude", ("lm_head",)))}


def quantized_weight_bytes(s: ModelShape, spec: dict, pb: float, full: int, tp: int = 1) -> tuple[int, str]:
    """Weights with every decoder Linear quantized: ``n bits/8 + n/group x 2 B scale (+2 B zero point)``
    (``n / tp`` of them on each of ``tp`` tensor-parallel ranks)."""
    experts = sum(s.layer_expert_params)  # fused MoE experts: quantized per expert and output row like Linears
    n = (sum(s.layer_linear_params) + experts + (0 if spec["exclude_head"] or s.tied else s.head_params)) // tp
    g = spec["group_size"] or s.hidden  # per output channel: one scale per row of ``hidden`` inputs
    scale_b = 2 if spec["symmetric"] else 4
    q = n * spec["bits"] / 8 + n / g * scale_b
    what = "Linear and expert params" if experts else "Linear params"
    return int(full - n * pb + q), f"{n:,} {what} x {spec['bits']}/8 B + 1 scale per {g} ({scale_b} B) + other params x {pb:g} B"


def _kv_bytes(layers: list[LayerShape], tokens: int, batch: int, kv_dtype: str, cb: int, group: int, residual,
              static: bool = False) -> int:
    """KV cache bytes. Quantized (int8/int4/int2): openautoglm's KIVI stores (``openautoglm.kv``), term by term:
    codes ``bits/8`` B per element; float16 scale + minimum per key block of ``group`` tokens and channel
    (``4 D / group`` B per token and head) and per value group of ``min(group, D)`` channels and token; the
    full-precision window (``residual``, or ``"auto"``: sized to ``tokens``) holds the ``tokens - nq`` tokens not
    yet in whole quantized blocks (``nq = group * floor((tokens - residual) / group)``), ``cb`` B per element.
    ``static``: the preallocated store of ``tokens`` capacity (every block slot, plus a window ring of
    ``residual + group`` tokens)."""
    if kv_dtype not in _KV_BITS:
        raise ValueError(f"kv_dtype={kv_dtype!r}; accepted: {', '.join(_KV_BITS)}")
    bits = _KV_BITS[kv_dtype]
    if bits >= 16 or kv_dtype == "fp8":
        # transformers' caches: a sliding-window layer keeps its last window - 1 tokens (DynamicSlidingWindowLayer),
        # a static one (kv_static) window slots; MLA layers cache their latent (LayerShape.kv_elements)
        return int(sum(L.kv_elements() * (min(tokens, L.window - (0 if static else 1)) if L.window else tokens)
                       for L in layers) * batch * bits / 8)

    r = resolve_residual(residual, group, tokens, bits)
    if static:
        nq, window = -(-tokens // group) * group, r + group
    else:
        nq = max(0, (tokens - r) // group) * group
        window = tokens - nq
    total = sum(L.kv_heads * (nq * bytes_per_token(bits, L.head_dim, group, min(group, L.head_dim))
                              + window * 2 * L.head_dim * cb) for L in layers)
    return int(total * batch)
