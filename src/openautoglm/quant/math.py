"""Pure tensor math of integer quantization: quantize, dequantize, error bounds, int4 packing.

Conventions (one for every scheme, CPU and GPU alike):

* **symmetric** ``b``-bit: ``q = clamp(round(x / s), -qmax, qmax)`` with ``qmax = 2^(b-1) - 1`` and
  ``s = absmax / qmax``; ``x ~ q * s``. Codes are signed (int8 storage).
* **asymmetric** ``b``-bit: ``q = clamp(round((x - z) / s), 0, 2^b - 1)`` with ``s = (max - min) / (2^b - 1)``
  and the float offset ``z = min`` (the value of code 0, as in tinygemm/HQQ); ``x ~ q * s + z``.
  Codes are unsigned (uint8 storage). A float offset keeps the rounding error within half a step
  everywhere, where an integer zero point could not.
* **asymmetric, integer zero point** (``zero_point="int"``, the compact storage of w4): the range is widened
  to include 0, ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)`` is a code (uint8), and
  ``q = clamp(round(x / s) + z, 0, 2^b - 1)``; ``x ~ (q - z) * s``. ``min / s + z`` lies within half a
  step of 0, so the error bound stays half a step.
* **granularity**: ``"tensor"`` (one scale), ``"channel"`` (one per row of a ``(out, in)`` weight),
  ``"group"`` (one per ``group_size`` consecutive elements of a row) and ``"token"`` (one per row of an
  activation ``(..., hidden)``; the same reduction as ``"channel"``, computed at run time).

Shapes: ``x: (rows, cols)`` (any leading dims for ``"token"``); scales ``(rows, 1)`` for channel/token,
``(rows, cols // group_size)`` for group, ``()`` for tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (4, 8)
GRANULARITIES = ("tensor", "channel", "group", "token")
GROUP_SIZES = (32, 64, 128)
_EPS = 1e-12  # smallest scale: a constant group quantizes exactly to one code


def _check(x: torch.Tensor, bits: int, granularity: str, group_size: int | None) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; accepted: {', '.join(map(str, BITS))}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if not x.is_floating_point():
        raise TypeError(f"can only quantize floating tensors, got {x.dtype}")
    if granularity in ("channel", "group") and x.dim() != 2:
        raise ValueError(f"{granularity} quantization needs a 2-D (out, in) tensor, got shape {tuple(x.shape)}")
    if granularity == "group":
        if group_size is None or group_size < 1:
            raise ValueError(f"group quantization needs a positive group_size, got {group_size!r}")
        if x.shape[-1] % group_size:
            raise ValueError(f"group_size={group_size} does not divide the row length {x.shape[-1]}")
    if torch.isnan(x).any() or torch.isinf(x).any():
        raise ValueError("cannot quantize a tensor holding NaN or Inf values")


def _grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View ``x`` as ``(..., n_groups, group_len)`` so each reduction over the last dim is one scale."""
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    if granularity in ("channel", "token"):
        return x.unsqueeze(-2)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


@dataclass
class Quantized:
    """Integer codes plus what is needed to dequantize them.

    ``q``: codes, same shape as the input (int8 for symmetric, uint8 for asymmetric);
    ``scale``/``zero``: float32, shape ``(..., n_groups)``; ``zero`` is ``None`` when symmetric.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    granularity: str
    group_size: int | None = None
    zero_point: str = "float"

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def qparams(x: torch.Tensor, bits: int = 8, *, symmetric: bool = True, granularity: str = "channel",
            group_size: int | None = None, zero_point: str = "float") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zeros of ``x``, shape ``(..., n_groups)``: float32 scales; zeros ``None`` (symmetric),
    float32 offsets (``zero_point="float"``) or uint8 codes (``zero_point="int"``)."""
    _check(x, bits, granularity, group_size)
    if zero_point not in ("float", "int"):
        raise ValueError(f"zero_point={zero_point!r}; accepted: float, int")
    g = _grouped(x.float(), granularity, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (g.abs().amax(-1) / qmax).clamp_min(_EPS), None
    lo, hi = g.amin(-1), g.amax(-1)
    if zero_point == "int":
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        scale = ((hi - lo) / (2**bits - 1)).clamp_min(_EPS)
        return scale, torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1).to(torch.uint8)
    return ((hi - lo) / (2**bits - 1)).clamp_min(_EPS), lo


def quantize(x: torch.Tensor, bits: int = 8, *, symmetric: bool = True, granularity: str = "channel",
             group_size: int | None = None, zero_point: str = "float") -> Quantized:
    """Round-to-nearest quantization of ``x`` (see the module docstring for the conventions).

    Raises ``ValueError`` for unsupported bits, a group size that does not divide the rows, or NaN/Inf.
    """
    scale, zero = qparams(x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size,
                          zero_point=zero_point)
    g = _grouped(x.float(), granularity, group_size)
    s = scale.unsqueeze(-1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(g / s), -qmax, qmax).to(torch.int8)
    elif zero_point == "int":
        q = torch.clamp(torch.round(g / s) + zero.unsqueeze(-1).float(), 0, 2**bits - 1).to(torch.uint8)
    else:
        q = torch.clamp(torch.round((g - zero.unsqueeze(-1)) / s), 0, 2**bits - 1).to(torch.uint8)
    return Quantized(q.reshape(x.shape), scale, zero, bits, granularity, group_size, zero_point)


def dequantize(qt: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float tensor ``q * scale (+ zero)`` or ``(q - zero) * scale`` (integer zero point), original shape."""
    g = _grouped(qt.q.float(), qt.granularity, qt.group_size)
    if qt.zero is not None and qt.zero_point == "int":
        g = g - qt.zero.unsqueeze(-1).float()
    out = g * qt.scale.unsqueeze(-1)
    if qt.zero is not None and qt.zero_point == "float":
        out = out + qt.zero.unsqueeze(-1)
    return out.reshape(qt.q.shape).to(dtype)


def error_bound(x: torch.Tensor, bits: int = 8, *, symmetric: bool = True, granularity: str = "channel",
                group_size: int | None = None, zero_point: str = "float") -> torch.Tensor:
    """Worst-case absolute rounding error of each element of ``x``: half a quantization step.

    The step is ``range / (2^b - 1)`` (asymmetric, range = max - min of the element's group) or
    ``absmax / (2^(b-1) - 1)`` (symmetric: the levels ``-qmax..qmax`` span ``2 * absmax`` in ``2^b - 2`` steps);
    with an integer zero point the range is first widened to include 0.
    Returns a float32 tensor of ``x``'s shape.
    """
    scale, _ = qparams(x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size,
                       zero_point=zero_point)
    g = _grouped(torch.empty_like(x, dtype=torch.float32), granularity, group_size)
    return (scale.unsqueeze(-1) / 2).expand_as(g).reshape(x.shape)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric activation quantization, one scale per token.

    ``x: (..., hidden)`` -> codes ``int8 (..., hidden)`` and scales ``float32 (..., 1)``.
    Traceable by ``torch.compile`` (no data-dependent Python).
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(_EPS)
    return torch.clamp(torch.round(xf / scale), -qmax, qmax).to(torch.int8), scale


# ----------------------------------------------------------------------------- int4 packing

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes two per byte: ``(..., 2k) -> (..., k) uint8``.

    The even element goes to the high nibble (the order ``torch._convert_weight_to_int4pack`` expects).
    """
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    if q.numel() and int(q.max()) > 15:
        raise ValueError("int4 codes must lie in 0..15")
    return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``(..., k) uint8 -> (..., 2k) uint8`` codes in 0..15."""
    hi = packed >> 4
    lo = packed & 15
    return torch.stack((hi, lo), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_int4_k32(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes in the decode kernels' ``"k32"`` order: ``(..., K) -> (..., K/2) uint8``.

    Each block of 32 codes fills 16 bytes read as four little-endian int32 words ``w = 0..3``; nibble ``p``
    (bits ``4p..4p+3``) of word ``w`` holds code ``4 p + w`` of the block. So one nibble position of the four
    words covers 4 consecutive codes, which the kernels turn into floats with one shift and one ``lop3``
    (see :mod:`.triton_decode`). Needs ``K % 32 == 0``; a byte-aligned cut at a multiple of 32 codes stays a
    valid k32 matrix (tensor parallelism slices it like the pair order).
    """
    if q.shape[-1] % 32:
        raise ValueError(f"k32 int4 packing needs a multiple of 32 codes per row, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    if q.numel() and int(q.max()) > 15:
        raise ValueError("int4 codes must lie in 0..15")
    c = q.reshape(*q.shape[:-1], q.shape[-1] // 32, 4, 2, 4)   # (block, nibble pair j, low/high, word w)
    byte = c[..., 0, :] | (c[..., 1, :] << 4)                  # (block, j, w): byte j of word w
    return byte.transpose(-1, -2).reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4_k32(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_k32`: ``(..., K/2) uint8 -> (..., K) uint8`` codes in natural order."""
    if packed.shape[-1] % 16:
        raise ValueError(f"k32 int4 codes come in 16-byte blocks, got {packed.shape[-1]} bytes per row")
    b = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 16, 4, 4).transpose(-1, -2)  # (block, j, w)
    c = torch.stack((b & 15, b >> 4), dim=-2)                  # (block, j, low/high, w)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def to_fp8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale rows of ``x`` into float8 e4m3 range: codes ``float8_e4m3fn`` and float32 scales (keepdim)."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    xf = x.float()
    scale = (xf.abs().amax(dim, keepdim=True) / fmax).clamp_min(_EPS)
    return (xf / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn), scale
