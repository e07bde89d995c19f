"""Pure tensor math of the quantized KV cache: asymmetric group quantization and bit packing.

KIVI layout (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):

* keys are quantized **per channel**: a block of ``G`` consecutive tokens shares one scale and one
  minimum per channel (outlier channels get their own range);
* values are quantized **per token**: each token's ``head_dim`` channels are cut into groups of ``Gv``
  channels, each with its own scale and minimum.

Integers are stored unsigned in ``[0, 2**bits - 1]``, ``8 // bits`` of them per byte along the last
dimension; scales and minima are float16 (two bytes each per group).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers ``q: (..., g)`` (uint8, values < 2**bits) into ``(..., g * bits // 8)`` bytes."""
    _check_bits(bits)
    if bits == 8:
        return q
    per = 8 // bits
    if q.shape[-1] % per:
        raise ValueError(f"last dimension {q.shape[-1]} is not a multiple of {per} for {bits}-bit packing")
    q = q.view(*q.shape[:-1], q.shape[-1] // per, per)
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (bits * i)
    return out


def _unpack4(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)


def _unpack2(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6], dim=-1).flatten(-2)


# Literal shifts and masks: under torch.compile(dynamic=True) an integer computed from ``bits`` can be
# traced as a symbol, and torch 2.11 could not evaluate ``1 << symbol``.
UNPACK = {8: lambda p: p, 4: _unpack4, 2: _unpack2}


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., n) -> (..., n * 8 // bits)`` uint8."""
    _check_bits(bits)
    return UNPACK[bits](p)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization over the last dimension (one group per row).

    Parameters
    ----------
    x : (..., g) float tensor
    bits : 2, 4 or 8

    Returns
    -------
    packed : (..., g * bits // 8) uint8
    scale, minimum : (..., 1) float16, so that ``x ~= q * scale + minimum``
    """
    _check_bits(bits)
    xf = x.float()
    mn = xf.amin(dim=-1, keepdim=True)
    mx = xf.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((mx - mn) / levels).clamp_min(1e-8)
    # Round the stored float16 scale/min first, so integers are computed against what dequantize sees.
    scale = scale.to(SCALE_DTYPE)
    mn = mn.to(SCALE_DTYPE)
    q = ((xf - mn.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return pack(q, bits), scale, mn


def dequantize(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``(..., n) uint8`` packed integers -> ``(..., n * 8 // bits)`` values of ``dtype``."""
    q = unpack(packed, bits).float()
    return (q * scale.float() + mn.float()).to(dtype)


# ---- KIVI block layouts -------------------------------------------------------------------------

def quantize_keys(k: torch.Tensor, bits: int, group: int):
    """Per-channel key quantization of whole blocks of ``group`` tokens.

    k : (batch, heads, n_blocks * group, head_dim)
    returns packed (batch, heads, n_blocks, head_dim, group * bits // 8), scale and min
    (batch, heads, n_blocks, head_dim, 1).
    """
    b, h, n, d = k.shape
    if n % group:
        raise ValueError(f"{n} key tokens are not a whole number of blocks of {group}")
    blocks = k.view(b, h, n // group, group, d).transpose(-1, -2)  # (b, h, nb, d, group)
    return quantize(blocks, bits)


def dequantize_keys(packed, scale, mn, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_keys`: returns (batch, heads, n_blocks * group, head_dim)."""
    x = dequantize(packed, scale, mn, bits, dtype)  # (b, h, nb, d, group)
    b, h, nb, d, g = x.shape
    return x.transpose(-1, -2).reshape(b, h, nb * g, d)


def quantize_values(v: torch.Tensor, bits: int, group: int):
    """Per-token value quantization with channel groups of ``group``.

    v : (batch, heads, n, head_dim) with ``head_dim % group == 0``
    returns packed (batch, heads, n, head_dim // group, group * bits // 8), scale and min
    (batch, heads, n, head_dim // group, 1).
    """
    b, h, n, d = v.shape
    if d % group:
        raise ValueError(f"head_dim={d} is not a multiple of the value group size {group}")
    return quantize(v.reshape(b, h, n, d // group, group), bits)


def dequantize_values(packed, scale, mn, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_values`: returns (batch, heads, n, head_dim)."""
    return dequantize(packed, scale, mn, bits, dtype).flatten(-2)
