"""Per-layer mixed recipes for the estimator: several weight-quantization configs, per-layer KV cache widths.

* ``quantization=[QuantConfig(scheme="w4", include=["model.layers.0.*"]), QuantConfig(scheme="w8"), ...]``:
  every Linear takes the *first* config that selects it (include/exclude patterns, as
  :func:`openautoglm.quant.quantize` applied in that order does); the estimator rebuilds the model on the
  meta device with those quantized modules (:func:`apply_quant_structure`), so weight bytes are exact.
* ``kv_dtype=["int8", "int4", None, ...]``: one KV element type per decoder layer (None/"bf16": full precision).
* quantized Linears need a transient at prefill (:func:`quantized_linear_workspace`), counted as ``workspace``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._util.modules import set_module
from ..quant.api import empty_quantized, select_modules
from ..quant.config import QuantConfig
from .shapes import _meta_model_from_config, _to_model

KV_FULL = (None, 16, "bf16", "fp16", "fp32")
_KV_NAMES = {8: "int8", 4: "int4", 2: "int2"}


def as_config_list(quantization) -> list | None:
    """A list of QuantConfigs when ``quantization`` asks for a per-module recipe, else None (uniform form)."""
    if isinstance(quantization, QuantConfig):
        return [quantization] if tuple(quantization.include) != ("*",) else None
    if isinstance(quantization, (list, tuple)):
        if not quantization:
            raise ValueError("quantization=[] holds no config; pass None for an unquantized model")
        out = []
        for q in quantization:
            if isinstance(q, dict):
                q = QuantConfig.from_dict(q.get("config", q))
            if not isinstance(q, QuantConfig):
                raise TypeError(f"quantization list entries must be QuantConfig or dicts, got {type(q).__name__}")
            out.append(q)
        return out
    return None


def apply_quant_structure(model: nn.Module, configs: Sequence) -> dict[str, str]:
    """Swap the Linears of a meta-device ``model`` that ``configs`` select for empty quantized modules, in place.

    Each Linear (and fused-experts module) takes the first config that selects it, chosen by the same selector as
    :func:`openautoglm.quant.quantize` (:func:`openautoglm.quant.api.select_modules`: ``nn.Linear``, GPT-2's
    ``Conv1D`` and transformers' experts modules, tied and unsupported shapes left float). Returns
    ``{module name: scheme}``.
    """
    chosen: dict[str, str] = {}
    for cfg in configs:
        names, _ = select_modules(model, cfg, skip_quantized=True)
        for name in names:
            set_module(model, name, empty_quantized(model.get_submodule(name), cfg, device="meta"))
            chosen[name] = cfg.scheme
    return chosen


def quantized_linear_workspace(scheme: str, tokens: int, in_features: int, out_features: int, cb: int,
                               cuda: bool = True) -> int:
    """Transient bytes of one quantized Linear at prefill of ``tokens`` rows (``quant/kernels.py``):

    * w8 / w4: the weight dequantized to the compute dtype before the GEMM: ``N K cb`` on CUDA (Triton writes it
      once); the torch path (CPU) holds the unpacked codes, their float copy and two elementwise results:
      ``N K (1 + 3 cb)`` for w4, ``2 N K cb`` for w8 (measured with ``MemoryProfiler``);
    * w8a8 / static (int8 GEMM): int8 activations ``M K`` + the int32 accumulator and two fp32 rescaling
      temporaries alive together (``acc.float() * xs * ws``): ``12 M N`` (+ an fp32 copy of the input, ``4 M K``,
      in the CPU per-token quantizer);
    * w8a8-fp8 on a GPU: e4m3 activations ``M K`` (``_scaled_mm`` writes the output dtype directly); the CPU
      emulation dequantizes both operands to fp32: ``4 (M K + N K)``.
    """
    M, K, N = tokens, in_features, out_features
    if scheme in ("w8", "w4"):
        if cuda:
            return N * K * cb
        return N * K * (1 + 3 * cb) if scheme == "w4" else 2 * N * K * cb
    if scheme in ("w8a8", "static"):
        return M * K + 12 * M * N + (0 if cuda else 4 * M * K)
    if scheme == "w8a8-fp8":
        return M * K if cuda else 4 * (M * K + N * K)
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def experts_workspace(scheme: str, in_features: int, rows: int, experts: int, cb: int, cuda: bool = True) -> int:
    """Transient of a stack of quantized experts (``rows`` = all experts' output rows) at prefill: on CUDA the whole
    stack dequantized for the grouped GEMM (``quant/kernels/moe.py``, every scheme); on the CPU, the reference loop
    dequantizes one expert's weight at a time (w8 / w4 as a Linear's, e4m3 emulated in float32); the int8 GEMM's
    transients scale with the expert's tokens and are priced with the loop (``formulas.moe_loop_transient``)."""
    if cuda:
        return rows * in_features * cb
    n = rows // experts
    if scheme in ("w8", "w4"):
        return quantized_linear_workspace(scheme, 0, in_features, n, cb, cuda=False)
    return 4 * n * in_features if scheme == "w8a8-fp8" else 0


def prefill_workspace(s, spec, T: int, head_rows: int, cb: int, h: int, layers, cuda: bool = True):
    """The estimator's ``workspace`` term at inference, ``(at the decoder layers, at lm_head, formula)``: the
    prefill transient of the largest quantized decoder Linear over ``T`` tokens, and that of a quantized lm_head
    over ``head_rows`` rows (the logits computed); for an analytic ``spec`` the largest decoder Linear
    dequantized. None when nothing is quantized. ``s`` is a ModelShape."""
    if s.quantized_linears:
        head = [q for q in s.quantized_linears if q[2] == s.vocab and q[3] == 1]  # (a stack of experts is not)
        dec = [q for q in s.quantized_linears if q not in head]
        b = max([(quantized_linear_workspace(sc, T, k, n, cb, cuda) if e == 1 else
                  experts_workspace(sc, k, n, e, cb, cuda), f"{sc} {n}x{k}" + (f" ({e} experts)" if e > 1 else ""))
                 for sc, k, n, e in dec] + [(0, "")])
        hb = max([quantized_linear_workspace(sc, head_rows, k, n, cb, cuda) for sc, k, n, _ in head] + [0])
        return b[0], hb, f"largest quantized-Linear prefill transient ({b[1] or 'lm_head'}; mixed.quantized_linear_workspace)"
    if spec:  # analytic quantization: weight-only, dequantized weight of the largest decoder Linear
        n = max(max(h * L.intermediate, h * L.heads * L.head_dim) for L in layers)
        return quantized_linear_workspace("w4" if spec["bits"] == 4 else "w8", T, 1, n, cb, cuda), 0, \
            "largest decoder Linear dequantized to the compute dtype (weight-only prefill)"
    return None


def kv_dtype_list(kv_dtype, n_layers: int) -> list[str] | None:
    """Normalize a per-layer KV list (bits or names, None = full precision) to estimator names, else None."""
    if not isinstance(kv_dtype, (list, tuple)):
        return None
    if len(kv_dtype) != n_layers:
        raise ValueError(f"kv_dtype has {len(kv_dtype)} entries; the model has {n_layers} layers (one per layer)")
    out = []
    for v in kv_dtype:
        if v in KV_FULL:
            out.append(None)
        elif isinstance(v, int) and not isinstance(v, bool) and v in _KV_NAMES:
            out.append(_KV_NAMES[v])
        elif isinstance(v, str):
            out.append(v)
        else:
            raise ValueError(f"per-layer KV entry {v!r}; accepted: None/16 (full precision), 8, 4, 2 or dtype names")
    return out


def meta_copy(model_or_config, dtype: torch.dtype | None = None) -> nn.Module:
    """A meta-device copy of a model (its recorded transforms applied), float parameters in ``dtype`` (None:
    as built)."""
    import copy

    if isinstance(model_or_config, nn.Module):  # its own config copy: surgery on the copy never touches the model
        model = _meta_model_from_config(copy.deepcopy(model_or_config.config))
    else:
        model, _ = _to_model(model_or_config)
        if any(not p.is_meta for p in model.parameters()):
            model = _meta_model_from_config(copy.deepcopy(model.config))
    for p in model.parameters():
        if dtype is not None and p.is_floating_point() and p.dtype != dtype:
            p.data = torch.empty_like(p, dtype=dtype, device="meta")
    return model
