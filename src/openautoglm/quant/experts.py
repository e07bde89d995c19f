"""Quantized fused experts: the drop-in replacement of transformers' experts modules (``mlp.experts``).

transformers 5 keeps a layer's experts as two 3-D parameters (``gate_up_proj``, ``down_proj``; see
:mod:`openautoglm._hf.moe` for each family's layout). :class:`QuantExperts` holds each of them as ONE quantized layer
of :mod:`.linear` whose output rows are the experts' rows stacked along a leading expert dim: ``gate_up`` is the
``(E * N, h)`` matrix whose rows ``[e N, (e + 1) N)`` are expert ``e``'s ``(N, h)`` projection (``N`` = 2I with a
gate, interleaved or concatenated as the family stores it), ``down`` the ``(E * h, I)`` one. Quantization is per
output channel / per group along the input, so every expert is quantized exactly as a Linear of its own weights
would be -- same codes, same scales, same packed layouts (codes ``(E N, K/2)`` for w4 are the experts' ``(N, K/2)``
codes one after the other) -- and every kernel of the Linear formats reads them. Family details stay as stored:
GPT-OSS's transposed ``(E, in, out)`` weights are quantized as ``(out, in)``, its biases kept in 16 bits, its
clamped SwiGLU (``_apply_gate``) run as the family defines it.

``forward(hidden_states (T, h), top_k_index (T, k), top_k_weights (T, k)) -> (T, h)`` is transformers' experts
signature, so the MoE block (router, shared experts) runs unchanged around it; the computation is dispatched in
:func:`openautoglm.quant.kernels.moe.experts_forward` (routed experts only: decode reads the top-k experts' codes).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
from torch import nn

from .._hf import moe as _moe
from .config import QuantConfig
from .kernels import moe as moe_kernels
from .linear import LINEAR_CLASSES, QuantLinear

EXPERT_SCHEMES = ("w8a8", "w8a8-fp8", "w8", "w4")


class QuantExperts(nn.Module):
    """``num_experts`` quantized experts of width ``intermediate_dim``; ``gate_up`` / ``down`` quantized stacks.

    Parameters
    ----------
    num_experts, hidden_dim, intermediate_dim : E, h, I.
    up_rows : output rows of each expert's first projection (2I with a gate, I without).
    config : the quantization recipe (``scheme`` one of :data:`EXPERT_SCHEMES`).
    has_bias : per-expert biases (GPT-OSS), kept in the model dtype.
    gate_fn, act : the source module's ``_apply_gate`` (None: the plain activation ``act["act_fn"]``) and the
        attributes it reads (``act_fn``, GPT-OSS's ``alpha`` / ``limit``).
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, up_rows: int, config: QuantConfig,
                 dtype: torch.dtype, device="meta", *, has_bias: bool = False, gate_fn=None, act: dict | None = None):
        super().__init__()
        if config.scheme not in EXPERT_SCHEMES:
            raise ValueError(f"scheme {config.scheme!r} is not offered for experts; accepted: {', '.join(EXPERT_SCHEMES)}")
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.up_rows = (
            num_experts, hidden_dim, intermediate_dim, up_rows)
        self.config = config
        stack_cfg = dataclasses.replace(config, kernel="auto") if config.kernel == "tinygemm" else config
        cls = LINEAR_CLASSES[config.scheme]
        self.gate_up = cls(hidden_dim, num_experts * up_rows, has_bias, stack_cfg, dtype, device)
        self.down = cls(intermediate_dim, num_experts * hidden_dim, has_bias, stack_cfg, dtype, device)
        for k, v in (act or {}).items():
            setattr(self, k, v)
        self._gate_fn = gate_fn
        self._views: dict = {}

    @property
    def scheme(self) -> str:
        return self.config.scheme

    # ---- construction ------------------------------------------------------------------------------------

    @staticmethod
    def _shapes(module: nn.Module) -> tuple[int, int, int, int]:
        e, h, i = _moe.sizes(module)
        return e, h, i, int(_moe.weight_out_in(module, "up").shape[1])

    @classmethod
    def supports(cls, module: nn.Module, config: QuantConfig) -> str | None:
        """``None`` when the experts of ``module`` can be quantized with ``config``, else the reason."""
        if config.scheme not in EXPERT_SCHEMES:
            return f"scheme {config.scheme!r} is not offered for experts (calibrated static int8 is per Linear)"
        e, h, i, n_up = cls._shapes(module)
        lin = LINEAR_CLASSES[config.scheme]
        for what, k, n in (("gate_up", h, n_up), ("down", i, h)):
            why = lin.supports(SimpleNamespace(in_features=k, out_features=n), config)
            if why:
                return f"{what} of each expert: {why}"
        return None

    @classmethod
    def empty(cls, module: nn.Module, config: QuantConfig, device="meta") -> "QuantExperts":
        """Empty quantized experts of ``module``'s shape (a transformers experts module, float or on meta)."""
        e, h, i, n_up = cls._shapes(module)
        w = _moe.weight_out_in(module, "up")
        dtype = w.dtype if w.is_floating_point() else torch.bfloat16
        return cls(e, h, i, n_up, config, dtype, device, has_bias=_moe.bias(module, "up") is not None,
                   gate_fn=_moe.gate_function(module), act=_moe.activation_attrs(module))

    @classmethod
    @torch.no_grad()
    def from_experts(cls, module: nn.Module, config: QuantConfig) -> "QuantExperts":
        """Quantize a transformers experts module, one expert at a time (float temporaries of one expert)."""
        w = _moe.weight_out_in(module, "up")
        new = cls.empty(module, config, device=w.device)
        for e in range(new.num_experts):
            new.fill_expert("up", e, _moe.weight_out_in(module, "up")[e], _bias_row(module, "up", e))
            new.fill_expert("down", e, _moe.weight_out_in(module, "down")[e], _bias_row(module, "down", e))
        new.gate_up._prepare_device()
        new.down._prepare_device()
        return new

    def stack(self, which: str) -> QuantLinear:
        return self.gate_up if which == "up" else self.down

    def rows(self, which: str) -> int:
        """Output rows of one expert of projection ``which``."""
        return self.up_rows if which == "up" else self.hidden_dim

    def fill_expert(self, which: str, e: int, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    offset: int = 0) -> None:
        """Quantize expert ``e``'s ``(rows, in)`` weight (or rows ``[offset, offset + rows)`` of it) into place."""
        self.stack(which).fill_rows(e * self.rows(which) + offset, weight, bias)

    def keep_experts(self, keep: list[int]) -> None:
        """Keep experts ``keep`` (in that order): each stack's stored tensors sliced where :meth:`QuantLinear.tp_slices`
        says an expert's rows live, and concatenated (expert pruning; works on the meta device)."""
        for which in ("up", "down"):
            st, n = self.stack(which), self.rows(which)
            parts: dict[str, list[torch.Tensor]] = {}
            for e in keep:
                for name, where in st.tp_slices("out", e * n, (e + 1) * n).items():
                    t = getattr(st, name)
                    parts.setdefault(name, []).append(t.narrow(where[0], where[1], where[2] - where[1])
                                                      if where is not None else t)
            for name, ts in parts.items():
                where = st.tp_slices("out", 0, n)[name]
                new = torch.cat(ts, dim=where[0]) if where is not None else ts[0]
                st._parameters[name] = nn.Parameter(new.detach(), requires_grad=False)
            st.out_features = len(keep) * n
            st._prepare_device()
        self.num_experts = len(keep)
        self._views = {}

    # ---- computation -------------------------------------------------------------------------------------

    def expert(self, which: str, e: int) -> QuantLinear:
        """Expert ``e`` of projection ``which`` as a quantized Linear (views of the stack's tensors, cached)."""
        key = (which, e)
        v = self._views.get(key)
        if v is None:
            n = self.rows(which)
            v = self._views[key] = self.stack(which).row_block(e * n, (e + 1) * n)
        return v

    def _apply(self, fn, recurse=True):
        self._views = {}  # views of the old storage
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copies and pickles rebuild the per-expert views from their own stacks
        return {**super().__getstate__(), "_views": {}}

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``(S, up_rows) -> (S, I)``: the family's gated activation (or the plain activation without a gate)."""
        if self._gate_fn is not None:
            return self._gate_fn(self, gate_up)
        return self.act_fn(gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        """``hidden_states (T, h)``, ``top_k_index (T, k)`` expert ids, ``top_k_weights (T, k)`` -> ``(T, h)``."""
        return moe_kernels.experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        g = f", group_size={self.config.group_size}" if self.config.group_size else ""
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"scheme={self.scheme}{g}")


def _bias_row(module: nn.Module, which: str, e: int) -> torch.Tensor | None:
    b = _moe.bias(module, which)
    return None if b is None else b[e]


def is_quant_experts(module: nn.Module) -> bool:
    return isinstance(module, QuantExperts)
