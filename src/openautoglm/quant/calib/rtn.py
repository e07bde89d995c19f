"""Group-wise integer codes for any bit width (2, 3, 4, 8), round to nearest, and padding of ragged groups.

The conventions are those of :mod:`openautoglm.quant.math` (read its docstring), extended to 2 and 3 bits:

* symmetric: ``q = clamp(round(w / s), -qmax, qmax)``, ``qmax = 2^(b-1) - 1``, ``w ~ q * s`` (int8 codes);
* asymmetric, float offset (``zero_point="float"``): ``q = clamp(round((w - z) / s), 0, 2^b - 1)``, ``w ~ q * s + z``
  with ``z`` the value of code 0 (uint8 codes, float32 ``z``);
* asymmetric, integer zero point (``zero_point="int"``): the range widened to include 0,
  ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w ~ (q - z) * s`` (uint8 codes and zero points).

Groups run along the input dim of a ``(out, in)`` weight: group ``g`` is columns ``[g * G, (g + 1) * G)``.
When ``G`` does not divide ``in``, the last group is *ragged*: its parameters come from its real columns only and
:meth:`GroupQuant.padded` gives codes of ``ceil(in / G) * G`` columns whose padding dequantizes to (the code
nearest) 0, so a kernel that pads the activations with zeros computes the same product. Or pick
:func:`dividing_group_size`. Either way no layer has to stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..math import Quantized

CALIB_BITS = (2, 3, 4, 8)
_EPS = 1e-12


def check_args(bits: int, group_size: int | None, zero_point: str = "float") -> None:
    if bits not in CALIB_BITS:
        raise ValueError(f"bits={bits!r} is not supported; accepted: {', '.join(map(str, CALIB_BITS))}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be a positive int or None (one group per row)")
    if zero_point not in ("float", "int"):
        raise ValueError(f"zero_point={zero_point!r}; accepted: float, int")


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if not group_size else -(-in_features // group_size)


def dividing_group_size(in_features: int, preferred: int, candidates=(256, 128, 64, 32, 16)) -> int | None:
    """Largest of ``candidates`` that is ``<= preferred`` and divides ``in_features`` (``None`` when none does).

    ``dividing_group_size(576, 128) == 64`` (SmolLM2's hidden size).
    """
    for g in sorted(candidates, reverse=True):
        if g <= preferred and in_features % g == 0:
            return g
    return None


def pad_columns(w: torch.Tensor, group_size: int | None, mode: str = "edge") -> torch.Tensor:
    """``w: (out, in) -> (out, ceil(in / G) * G)``: ``"edge"`` repeats the last column (min, max and absmax of the
    ragged group unchanged), ``"zero"`` pads with zeros (activations, Hessian columns)."""
    if not group_size or w.shape[-1] % group_size == 0:
        return w
    extra = group_size - w.shape[-1] % group_size
    if mode == "edge":
        pad = w[..., -1:].expand(*w.shape[:-1], extra)
    elif mode == "zero":
        pad = w.new_zeros(*w.shape[:-1], extra)
    else:
        raise ValueError(f"mode={mode!r}; accepted: edge, zero")
    return torch.cat([w, pad], dim=-1)


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``(out, in) -> (out, n_groups, G)`` (ragged last group edge-padded); per-row groups when ``G`` is None."""
    if not group_size:
        return w.unsqueeze(-2)
    wp = pad_columns(w, group_size)
    return wp.reshape(*w.shape[:-1], wp.shape[-1] // group_size, group_size)


def params(wg: torch.Tensor, bits: int, symmetric: bool, zero_point: str = "float",
           clip: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero of each group, reducing the last dim of ``wg: (..., G)`` -> ``(...)``.

    ``clip`` (scalar or ``(...)``) shrinks the range: absmax (symmetric) or min and max (asymmetric) times ``clip``.
    """
    wg = wg.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = wg.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        return (amax / qmax).clamp_min(_EPS), None
    lo, hi = wg.amin(-1), wg.amax(-1)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    levels = 2**bits - 1
    if zero_point == "int":
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        scale = ((hi - lo) / levels).clamp_min(_EPS)
        return scale, torch.clamp(torch.round(-lo / scale), 0, levels)
    return ((hi - lo) / levels).clamp_min(_EPS), lo


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                   zero_point: str = "float") -> torch.Tensor:
    """Float codes of ``w`` given broadcastable ``scale``/``zero`` (``zero`` None: symmetric)."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(w / scale), -qmax, qmax)
    if zero_point == "int":
        return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return torch.clamp(torch.round((w - zero) / scale), 0, 2**bits - 1)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     zero_point: str = "float") -> torch.Tensor:
    if zero is None:
        return q * scale
    if zero_point == "int":
        return (q - zero) * scale
    return q * scale + zero


def expand(t: torch.Tensor | None, group_size: int | None, in_features: int) -> torch.Tensor | None:
    """Per-group ``(out, n_groups)`` -> per-column ``(out, in)`` (``None`` stays ``None``)."""
    if t is None:
        return None
    if not group_size:
        return t.expand(-1, in_features)
    return t.repeat_interleave(group_size, dim=-1)[:, :in_features]


@dataclass
class GroupQuant:
    """Codes and parameters of one ``(out, in)`` weight.

    ``q``: float codes ``(out, in)`` (integers held in float32, cast by :meth:`padded`); ``scale`` ``(out, n_groups)``
    float32; ``zero`` ``(out, n_groups)`` float32 offsets (``zero_point="float"``), integer-valued zero points
    (``"int"``), or ``None`` (symmetric). ``group_size`` ``None`` means one group per row.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int | None
    zero_point: str = "float"

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def in_features(self) -> int:
        return self.q.shape[-1]

    def _expand(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return expand(t, self.group_size, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(out, in)`` the codes stand for."""
        w = dequantize_codes(self.q, self._expand(self.scale), self._expand(self.zero), self.zero_point)
        return w.to(dtype)

    def padded(self) -> Quantized:
        """:class:`~openautoglm.quant.math.Quantized` of ``(out, ceil(in / G) * G)`` codes (int8 symmetric, uint8
        otherwise), the padding set to the code of 0, for the packers of :mod:`openautoglm.quant.linear`."""
        q = self.q
        extra = n_groups(self.in_features, self.group_size) * (self.group_size or self.in_features) - self.in_features
        if extra:
            last_s = self.scale[:, -1:]
            last_z = None if self.zero is None else self.zero[:, -1:]
            zero_code = quantize_codes(torch.zeros_like(last_s), last_s, last_z, self.bits, self.zero_point)
            q = torch.cat([q, zero_code.expand(-1, extra)], dim=-1)
        dtype = torch.int8 if self.symmetric else torch.uint8
        zero = self.zero
        if zero is not None and self.zero_point == "int":
            zero = zero.to(torch.uint8)
        gran = "group" if self.group_size else "channel"
        return Quantized(q.to(dtype), self.scale, zero, self.bits, gran, self.group_size, self.zero_point)


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                    group_size: int | None, zero_point: str = "float") -> GroupQuant:
    """Codes of ``w: (out, in)`` with given per-group ``scale``/``zero: (out, n_groups)``."""
    k = w.shape[-1]
    q = quantize_codes(w.float(), expand(scale, group_size, k), expand(zero, group_size, k), bits, zero_point)
    return GroupQuant(q, scale, zero, bits, group_size, zero_point)


def rtn(w: torch.Tensor, bits: int = 4, group_size: int | None = 128, *, symmetric: bool = False,
        zero_point: str = "float", clip: torch.Tensor | float | None = None) -> GroupQuant:
    """Round-to-nearest codes of ``w: (out, in)``; a ragged last group is handled (see the module docstring)."""
    check_args(bits, group_size, zero_point)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"need a float (out, in) weight, got {tuple(w.shape)} {w.dtype}")
    scale, zero = params(group_view(w, group_size), bits, symmetric, zero_point, clip)
    return quantize_groups(w, scale, zero, bits, group_size, zero_point)


def fake_quant(w: torch.Tensor, bits: int = 4, group_size: int | None = 128, *, symmetric: bool = False,
               zero_point: str = "float") -> torch.Tensor:
    """``rtn(...).dequantize()`` in ``w``'s dtype."""
    return rtn(w, bits, group_size, symmetric=symmetric, zero_point=zero_point).dequantize(w.dtype)
