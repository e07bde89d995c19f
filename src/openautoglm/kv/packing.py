"""Pure tensor math of the quantized KV cache: asymmetric group quantization and bit packing.

KIVI layout (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):

* keys are quantized **per channel**: a block of ``G`` consecutive tokens shares one scale and one
  minimum per channel (outlier channels get their own range);
* values are quantized **per token**: each token's ``head_dim`` channels are cut into groups of ``Gv``
  channels, each with its own scale and minimum.

Storage (the same for keys and values, so one kernel reads both): every token's ``head_dim`` integer
codes are packed along the channels, ``per = 8 // bits`` codes a byte in *split* order: byte ``j`` holds
channels ``j + i * head_dim / per`` at bit ``bits * i`` (INT4: the low nibbles are the first half of the
channels, the high nibbles the second half), giving ``(batch, heads, tokens, head_dim * bits // 8)`` uint8.
A kernel then reads a contiguous range of channels with one shift and one mask, no shuffles.
Scales and minima are float16: keys ``(batch, heads, tokens // G, head_dim)`` (one row per block),
values ``(batch, heads, tokens, head_dim // Gv)``. Codes are unsigned, ``round(x - min) / scale`` in
``[0, 2**bits - 1]``, rounded half up (``floor(y + 0.5)``, what the Triton kernels compute too).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16
SCALE_FLOOR = 2.0**-14  # smallest normal float16: a constant group keeps a non-zero scale


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers ``q: (..., g)`` (uint8, values < 2**bits) into ``(..., g * bits // 8)`` bytes
    (split order: byte ``j`` holds elements ``j + i * g / per`` at bit ``bits * i``)."""
    _check_bits(bits)
    if bits == 8:
        return q
    per = 8 // bits
    if q.shape[-1] % per:
        raise ValueError(f"last dimension {q.shape[-1]} is not a multiple of {per} for {bits}-bit packing")
    q = q.view(*q.shape[:-1], per, q.shape[-1] // per)
    out = q[..., 0, :].clone()
    for i in range(1, per):
        out |= q[..., i, :] << (bits * i)
    return out


def _unpack4(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p & 15, p >> 4], dim=-1)


def _unpack2(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6], dim=-1)


# Literal shifts and masks: under torch.compile(dynamic=True) an integer computed from ``bits`` can be
# traced as a symbol, and torch 2.11 could not evaluate ``1 << symbol``.
UNPACK = {8: lambda p: p, 4: _unpack4, 2: _unpack2}


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., n) -> (..., n * 8 // bits)`` uint8."""
    _check_bits(bits)
    return UNPACK[bits](p)


def _codes(xf: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: int):
    levels = (1 << bits) - 1
    # Round the stored float16 scale/min first, so the codes are computed against what dequantize sees.
    scale = ((mx - mn) / levels).to(SCALE_DTYPE).clamp_min(SCALE_FLOOR)
    mn = mn.to(SCALE_DTYPE)
    q = torch.floor((xf - mn.float()) / scale.float() + 0.5).clamp_(0, levels).to(torch.uint8)
    return q, scale, mn


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
    q, scale, mn = _codes(xf, xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True), bits)
    return pack(q, bits), scale, mn


def dequantize(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``(..., n) uint8`` packed integers -> ``(..., n * 8 // bits)`` values of ``dtype``."""
    q = unpack(packed, bits).float()
    return (q * scale.float() + mn.float()).to(dtype)


# ---- KIVI block layouts -------------------------------------------------------------------------

def quantize_keys(k: torch.Tensor, bits: int, group: int):
    """Per-channel key quantization of whole blocks of ``group`` tokens.

    k : (batch, heads, n_blocks * group, head_dim)
    returns packed (batch, heads, n_blocks * group, head_dim * bits // 8) uint8 and scale, min
    (batch, heads, n_blocks, head_dim) float16.
    """
    _check_bits(bits)
    b, h, n, d = k.shape
    if n % group:
        raise ValueError(f"{n} key tokens are not a whole number of blocks of {group}")
    blocks = k.float().reshape(b, h, n // group, group, d)
    q, scale, mn = _codes(blocks, blocks.amin(dim=-2, keepdim=True), blocks.amax(dim=-2, keepdim=True), bits)
    return pack(q.reshape(b, h, n, d), bits), scale.squeeze(-2), mn.squeeze(-2)


def dequantize_keys(packed, scale, mn, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_keys`: returns (batch, heads, n_blocks * group, head_dim)."""
    q = unpack(packed, bits).float()  # (b, h, n, d)
    b, h, n, d = q.shape
    nb = scale.shape[2]
    q = q.view(b, h, nb, n // nb, d)
    return (q * scale.float().unsqueeze(-2) + mn.float().unsqueeze(-2)).reshape(b, h, n, d).to(dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int):
    """Per-token value quantization with channel groups of ``group``.

    v : (batch, heads, n, head_dim) with ``head_dim % group == 0``
    returns packed (batch, heads, n, head_dim * bits // 8) uint8 and scale, min
    (batch, heads, n, head_dim // group) float16.
    """
    _check_bits(bits)
    b, h, n, d = v.shape
    if d % group:
        raise ValueError(f"head_dim={d} is not a multiple of the value group size {group}")
    x = v.float().reshape(b, h, n, d // group, group)
    q, scale, mn = _codes(x, x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), bits)
    return pack(q.reshape(b, h, n, d), bits), scale.squeeze(-1), mn.squeeze(-1)  # packed over the whole head


def dequantize_values(packed, scale, mn, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_values`: returns (batch, heads, n, head_dim)."""
    q = unpack(packed, bits).float()
    b, h, n, d = q.shape
    ng = scale.shape[-1]
    q = q.view(b, h, n, ng, d // ng)
    return (q * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)).reshape(b, h, n, d).to(dtype)


def bytes_per_token(bits: int, head_dim: int, group: int, value_group: int) -> float:
    """Bytes one quantized token costs per KV head (keys + values, codes + float16 scales and minima)."""
    codes = 2 * head_dim * bits / 8
    return codes + 4 * head_dim / group + 4 * head_dim / value_group
