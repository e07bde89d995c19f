"""Quantized drop-in replacements of ``nn.Linear``, one class per storage format.

Each class stores its codes and scales as frozen ``nn.Parameter`` s (so they move with ``.to()``, are
saved by ``state_dict`` under ``<module>.qweight`` / ``.scale`` / ``.zero`` / ``.act_scale`` and are
checked by the loader), can be built from a float ``nn.Linear`` (:meth:`from_linear`) or empty on the
meta device (:meth:`empty`, used when reloading a checkpoint), and computes through :mod:`.kernels`.
A new format is one new class plus one entry in :data:`LINEAR_CLASSES`.

Tensor parallelism (:mod:`openautoglm.parallel`) asks each class only how its stored tensors are cut along the
output or input features (:meth:`QuantLinear.tp_granularity`, :meth:`QuantLinear.tp_slices`): pure index
arithmetic on the packed layout, so a rank slices codes, scales and zero points consistently, in memory or
straight from the safetensors file, without dequantizing anything. A new layout implements those two.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .config import QuantConfig
from .kernels import ops
from .math import pack_int4, pack_int4_k32, quantize, to_fp8, unpack_int4_k32


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """Base class: ``in_features``, ``out_features``, optional float ``bias`` and the scheme's config."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig,
                 dtype: torch.dtype, device: torch.device | str = "meta") -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.bias = _frozen(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._alloc(dtype, torch.device(device))

    def _alloc(self, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _fill(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    @classmethod
    def supports(cls, linear: nn.Linear, config: QuantConfig) -> str | None:
        """``None`` when ``linear`` can be quantized with ``config``, else the reason it cannot."""
        k, n = linear.in_features, linear.out_features
        if config.group_size and k % config.group_size:
            return f"in_features {k} is not divisible by group_size {config.group_size}"
        if k % 16 or n % 16:
            return f"shape ({n}, {k}) is not a multiple of 16"
        return None

    @classmethod
    def empty(cls, linear: nn.Linear, config: QuantConfig, device="meta") -> "QuantLinear":
        dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16
        return cls(linear.in_features, linear.out_features, linear.bias is not None, config, dtype, device)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        w = linear.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError("weight holds NaN or Inf values")
        mod = cls.empty(linear, config, device=w.device)
        mod._fill(w)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        mod._prepare_device()
        return mod

    def _prepare_device(self) -> None:
        """Hook for derived, device-specific state (re-run after every ``.to()``): on a GPU, the split-K
        tickets of the decode kernels are allocated here, outside any CUDA graph."""
        w = getattr(self, "qweight", None)
        if w is not None and w.is_cuda:
            ops.tickets(w.device, -(-self.out_features // 8))  # one ticket per row block of the smallest tile

    def decode_operands(self) -> tuple | None:
        """``(codes, scales, zeros, fmt, group, groups_major)`` of the decode kernels (``ops.wq_gemv``), or ``None``
        when this layer does not decode through them; used to fuse layers that share an input."""
        return None

    def dequant_operands(self) -> tuple | None:
        """The same tuple for the prefill's dequantize + GEMM (``ops.dequant_cat``): only layers whose prefill
        is exactly that (weight-only formats on the Triton path), else ``None``."""
        return None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._prepare_device()
        return out

    @torch.no_grad()
    def fill_rows(self, r0: int, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantize ``weight (rows, in_features)`` into output rows ``[r0, r0 + rows)`` of this (allocated) layer,
        exactly as :meth:`from_linear` computes those rows (each output row depends on its own weights only):
        the block is quantized on its own and copied where :meth:`tp_slices` says the rows live. Used to quantize
        big weights in blocks and fused experts one expert at a time."""
        r1 = r0 + weight.shape[0]
        lin = nn.Linear(self.in_features, r1 - r0, bias=bias is not None, device="meta", dtype=weight.dtype)
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias, requires_grad=False)
        part = dict(type(self).from_linear(lin, self.config).named_parameters(recurse=False))
        for name, where in self.tp_slices("out", r0, r1).items():
            if name == "bias" and bias is None:
                continue
            dst = getattr(self, name)
            if where is not None:
                axis, lo, hi = where
                dst = dst.narrow(axis, lo, hi - lo)
            dst.data.copy_(part[name])

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` weight these codes stand for (torch ops; what the kernels compute with)."""
        return (self.qweight.float() * self.scale.float()).to(dtype)  # per-channel int8 / e4m3 codes

    def row_block(self, r0: int, r1: int) -> "QuantLinear":
        """A layer computing output rows ``[r0, r1)`` of this one, its tensors views of this one's (no copy):
        the per-expert layers of a stack of experts (:class:`~.experts.QuantExperts`)."""
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.config = self.in_features, r1 - r0, self.config
        for name, where in self.tp_slices("out", r0, r1).items():
            t = getattr(self, name)
            if where is not None:
                axis, lo, hi = where
                t = t.narrow(axis, lo, hi - lo)
            new.register_parameter(name, nn.Parameter(t, requires_grad=False))
        for name in ("bias", "zero"):
            if name not in new._parameters and hasattr(self, name):
                new.register_parameter(name, None)
        return new

    # ---- tensor parallelism: how this layout is cut (openautoglm.parallel) --------------------------------

    def tp_granularity(self, dim: str) -> int:
        """Cuts along ``dim`` (``"out"`` or ``"in"`` features) must fall on multiples of this many features."""
        return 1

    def tp_slices(self, dim: str, start: int, stop: int) -> dict[str, tuple[int, int, int] | None]:
        """What a rank holding features ``[start, stop)`` of ``dim`` keeps of each stored tensor.

        Returns ``{state-dict name: (axis, lo, hi)}`` -- keep ``lo:hi`` along ``axis`` -- or ``None`` to keep
        the tensor whole (per-channel scales under an input cut, a scalar activation scale). Raises
        ``ValueError`` when the layout cannot be cut there (inside a quantization group or a packed byte).
        """
        size = self.out_features if dim == "out" else self.in_features
        if dim not in ("out", "in") or not 0 <= start < stop <= size:
            raise ValueError(f"cannot cut {dim!r} features [{start}, {stop}) of {self.extra_repr()}")
        g = self.tp_granularity(dim)
        if start % g or stop % g:
            raise ValueError(f"{self.scheme} layer ({self.extra_repr()}) can only be cut at multiples of {g} "
                             f"{dim} features{self._granularity_reason(dim)}; asked for [{start}, {stop})")
        out = {} if self.bias is None else {"bias": (0, start, stop) if dim == "out" else None}
        out.update(self._layout_slices(dim, start, stop))
        return out

    def _layout_slices(self, dim: str, start: int, stop: int) -> dict[str, tuple[int, int, int] | None]:
        raise NotImplementedError(f"{type(self).__name__} does not describe how to cut its tensors")

    def _granularity_reason(self, dim: str) -> str:
        return ""

    def extra_repr(self) -> str:
        g = f", group_size={self.config.group_size}" if self.config.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{g}"


class Int8DynamicLinear(QuantLinear):
    """w8a8: int8 weights (N, K) with per-channel scales (N, 1); per-token int8 activations at run time."""

    scheme = "w8a8"

    def _alloc(self, dtype, device):
        self.qweight = _frozen(torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device))
        self.scale = _frozen(torch.empty(self.out_features, 1, dtype=torch.float32, device=device))

    def _fill(self, weight):
        qt = quantize(weight, 8, symmetric=True, granularity="channel")
        self.qweight.data.copy_(qt.q)
        self.scale.data.copy_(qt.scale)

    def _layout_slices(self, dim, start, stop):
        # per-channel weight scales follow the output rows. An input cut quantizes each rank's slice of the
        # activations with its own per-token scale: finer than one process, so close to but not bitwise its result.
        if dim == "out":
            return {"qweight": (0, start, stop), "scale": (0, start, stop)}
        return {"qweight": (1, start, stop), "scale": None}

    def decode_operands(self):
        if self.config.kernel not in ("auto", "triton"):
            return None
        return self.qweight, self.scale, None, 8, self.in_features, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w8a8_linear(x, self.qweight, self.scale, self.bias, kernel=self.config.kernel)


class StaticInt8Linear(Int8DynamicLinear):
    """static: like w8a8 but activations use one calibrated per-layer scale ``act_scale`` (float32 scalar)."""

    scheme = "static"

    def _alloc(self, dtype, device):
        super()._alloc(dtype, device)
        self.act_scale = _frozen(torch.ones((), dtype=torch.float32, device=device))

    def _layout_slices(self, dim, start, stop):
        return {**super()._layout_slices(dim, start, stop), "act_scale": None}  # one calibrated scale: exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w8a8_linear(x, self.qweight, self.scale, self.bias, act_scale=self.act_scale,
                                   kernel=self.config.kernel)


class FP8DynamicLinear(QuantLinear):
    """w8a8-fp8: float8 e4m3 weights (N, K) with per-channel scales (N, 1); per-token e4m3 activations."""

    scheme = "w8a8-fp8"

    def _alloc(self, dtype, device):
        self.qweight = _frozen(torch.empty(self.out_features, self.in_features, dtype=torch.float8_e4m3fn, device=device))
        self.scale = _frozen(torch.empty(self.out_features, 1, dtype=torch.float32, device=device))

    def _fill(self, weight):
        q, s = to_fp8(weight, dim=-1)
        self.qweight.data.copy_(q)
        self.scale.data.copy_(s)

    def _layout_slices(self, dim, start, stop):
        return Int8DynamicLinear._layout_slices(self, dim, start, stop)

    def decode_operands(self):
        if self.config.kernel not in ("auto", "triton"):
            return None
        return self.qweight, self.scale, None, 9, self.in_features, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.fp8_linear(x, self.qweight, self.scale, self.bias, kernel=self.config.kernel)


class WeightOnlyLinear(QuantLinear):
    """w8 / w4: grouped weight-only codes, dequantized inside the matmul.

    Storage: ``qweight`` int8 ``(N, K)`` (w8) or uint8 ``(N, K/2)`` two int4 codes a byte (w4, even k in the
    high nibble; symmetric codes offset by 8); ``scale`` in the model dtype and ``zero`` (asymmetric w4 only)
    the integer zero-point codes packed two rows a byte (row 2i in the high nibble): ``w = (q - zero) * scale``.
    ``config.pack == "k32"`` (w4): the codes of each 32-column block are stored in the decode kernels' order
    (:func:`~.math.pack_int4_k32`), same bytes per row.
    ``config.layout == "groups"``: ``scale (K/group, N)``, ``zero (K/group, N/2)`` (one contiguous row per
    group, what the kernels read); ``"rows"`` (older checkpoints): ``scale (N, K/group)``, ``zero (N/2, K/group)``.
    Half a byte per group instead of a 16-bit float keeps w4 g128 at 0.53 bytes per weight.
    """

    scheme = "w4"

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def group(self) -> int:
        return self.config.group_size or self.in_features

    @property
    def groups_major(self) -> bool:
        return self.config.layout == "groups"

    @property
    def k32(self) -> bool:
        """int4 codes in the k32 order (else two consecutive codes a byte)."""
        return self.bits == 4 and self.config.pack == "k32"

    @classmethod
    def supports(cls, linear: nn.Linear, config: QuantConfig) -> str | None:
        why = super().supports(linear, config)
        if why is None and config.bits == 4 and config.pack == "k32" and linear.in_features % 32:
            return f"in_features {linear.in_features} is not a multiple of 32 (int4 k32 packing; pack='pairs' takes it)"
        return why

    def scale_rows(self) -> torch.Tensor:
        """The scales as ``(N, K/group)`` whatever the layout (a view)."""
        return self.scale.t() if self.groups_major else self.scale

    def zero_rows(self) -> torch.Tensor | None:
        """The packed zero points as ``(N/2, K/group)`` whatever the layout (a view), or ``None``."""
        if self.zero is None:
            return None
        return self.zero.t() if self.groups_major else self.zero

    def _alloc(self, dtype, device):
        n, k = self.out_features, self.in_features
        if self.bits == 4:
            self.qweight = _frozen(torch.empty(n, k // 2, dtype=torch.uint8, device=device))
        else:
            self.qweight = _frozen(torch.empty(n, k, dtype=torch.int8, device=device))
        g = k // self.group
        sshape, zshape = ((g, n), (g, n // 2)) if self.groups_major else ((n, g), (n // 2, g))
        self.scale = _frozen(torch.empty(sshape, dtype=dtype, device=device))
        self.zero = None if self.config.symmetric else _frozen(torch.empty(zshape, dtype=torch.uint8, device=device))

    def _fill(self, weight):
        gran = "group" if self.config.group_size else "channel"
        qt = quantize(weight, self.bits, symmetric=self.config.symmetric, granularity=gran,
                      group_size=self.config.group_size, zero_point="int")
        q = qt.q
        if self.bits == 4:
            q = q.to(torch.int16) + 8 if self.config.symmetric else q
            q = pack_int4_k32(q) if self.k32 else pack_int4(q)
        self.qweight.data.copy_(q)
        self.scale_rows().copy_(qt.scale.reshape(self.out_features, -1))
        if self.zero is not None:
            z = qt.zero.reshape(self.out_features, -1)
            self.zero_rows().copy_(pack_int4(z.t().contiguous()).t())

    def tp_granularity(self, dim: str) -> int:
        if dim == "out":
            return 2 if self.zero is not None else 1       # zero points: two rows a byte
        pack = (32 if self.k32 else 2) if self.bits == 4 else 1  # codes: 32-code blocks (k32) or two a byte
        return math.lcm(pack, self.config.group_size) if self.config.group_size else pack

    def _granularity_reason(self, dim: str) -> str:
        if dim == "out":
            return " (zero points are packed two rows a byte)"
        if self.config.group_size:
            return f" (quantization groups of {self.config.group_size})"
        return " (int4 codes in blocks of 32)" if self.k32 else " (int4 codes two a byte)"

    def _layout_slices(self, dim, start, stop):
        n_ax, g_ax = (1, 0) if self.groups_major else (0, 1)  # scale/zero axes of output rows and of groups
        if dim == "out":
            out = {"qweight": (0, start, stop), "scale": (n_ax, start, stop)}
            if self.zero is not None:
                out["zero"] = (n_ax, start // 2, stop // 2)
            return out
        per = 2 if self.bits == 4 else 1
        out = {"qweight": (1, start // per, stop // per)}
        g = self.config.group_size
        grouped = None if not g else (g_ax, start // g, stop // g)  # per-channel scales serve any input slice
        out["scale"] = grouped
        if self.zero is not None:
            out["zero"] = grouped
        return out

    def _prepare_device(self) -> None:
        super()._prepare_device()
        # kernel="tinygemm": a tinygemm-packed copy of the codes for decode, as non-persistent buffers (never
        # saved, but counted by model_bytes); rebuilt from the canonical codes whenever the module moves.
        tg_w = tg_sz = None
        if self.config.kernel == "tinygemm" and not self.qweight.is_meta and self.qweight.is_cuda:
            k = self.in_features
            tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            s = self.scale_rows()
            zc = kernels.unpack_zero(self.zero_rows()).to(s.dtype) if self.zero is not None else 8
            codes = pack_int4(unpack_int4_k32(self.qweight.data)) if self.k32 else self.qweight.data
            tg_w = torch._convert_weight_to_int4pack(codes, tiles)
            tg_sz = torch.stack([s.t(), ((8 - zc) * s).t()], -1).to(torch.bfloat16).contiguous()
        for name, t in (("_tg_w", tg_w), ("_tg_sz", tg_sz)):
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t, persistent=False)

    def decode_operands(self):
        if self.config.kernel not in ("auto", "triton"):
            return None
        return self.dequant_operands()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequant_torch(self.qweight, self.scale, self.zero, self.bits, self.group, dtype,
                                     self.groups_major, self.k32)

    def dequant_operands(self):
        if self.config.kernel == "torch":
            return None
        fmt = (5 if self.k32 else 4) if self.bits == 4 else 8
        return self.qweight, self.scale, self.zero, fmt, self.group, self.groups_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tg = getattr(self, "_tg_w", None)
        if tg is not None and x.is_cuda and x.dtype == torch.bfloat16 and x.numel() // x.shape[-1] <= kernels.DECODE_MAX_M:
            y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), tg, self.group, self._tg_sz)
            y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return kernels.weight_only_linear(x, self.qweight, self.scale, self.zero, self.bits, self.group, self.bias,
                                          kernel=self.config.kernel, groups_major=self.groups_major, k32=self.k32)


class _W8Linear(WeightOnlyLinear):
    scheme = "w8"


LINEAR_CLASSES: dict[str, type[QuantLinear]] = {
    "w8a8": Int8DynamicLinear,
    "w8a8-fp8": FP8DynamicLinear,
    "static": StaticInt8Linear,
    "w8": _W8Linear,
    "w4": WeightOnlyLinear,
}
