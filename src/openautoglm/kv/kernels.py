"""Device fast paths for reading a quantized KV cache.

Every decode step rebuilds one layer's keys and values from the packed blocks plus the
full-precision tail. Done eagerly that is five or six passes over the data (unpack, shift, convert,
scale, concatenate); on CUDA the same function is compiled once by ``torch.compile`` (dynamic
shapes, so the growing sequence does not recompile) into one kernel that reads the packed bytes and
writes the attention-ready tensor: one read of ``bits/16`` of the bf16 bytes and one write.
Set ``OPENAUTOGLM_KV_COMPILE=0`` to force the eager path (``force``: compile on the CPU too).
"""

from __future__ import annotations

import logging
import os

import torch

from . import packing

log = logging.getLogger(__name__)


def _make(bits: int):
    """The read function for ``bits``: ``bits`` is a closure constant, not an input, so the compiled
    kernel specialises on it (as an input under dynamic shapes it became symbolic and failed)."""

    up = packing.UNPACK[bits]  # resolved here: nothing derived from ``bits`` is traced

    def read(kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v):
        k = (up(kq).float() * ks.float() + km.float()).to(res_k.dtype)  # (b, h, n_blocks, d, group)
        b, h, nb, d, g = k.shape
        k = k.transpose(-1, -2).reshape(b, h, nb * g, d)
        v = (up(vq).float() * vs.float() + vm.float()).to(res_v.dtype).flatten(-2)  # (b, h, n, d)
        return torch.cat([k, res_k, new_k], dim=-2), torch.cat([v, res_v, new_v], dim=-2)

    return read


_eager = {bits: _make(bits) for bits in packing.SUPPORTED_BITS}
_compiled: dict[int, object] = {}
_state = {"compile_failed": False}


def _use_compile(t: torch.Tensor) -> bool:
    mode = os.environ.get("OPENAUTOGLM_KV_COMPILE", "1")  # 0: never, 1: on CUDA, force: everywhere
    return not _state["compile_failed"] and (mode == "force" or (mode != "0" and t.is_cuda))


def materialize(kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v, bits: int):
    """All keys and values of one layer: dequantized blocks, then the full-precision window, then new tokens.

    kq : (batch, heads, n_blocks, head_dim, group * bits // 8) uint8; ks, km : (..., 1) float16
    vq : (batch, heads, n_q, head_dim // vgroup, vgroup * bits // 8) uint8; vs, vm : (..., 1) float16
    res_k, res_v : (batch, heads, r, head_dim) window; new_k, new_v : (batch, heads, t, head_dim)
    returns keys, values: (batch, heads, n_q + r + t, head_dim) of the window's dtype
    """
    if vq.shape[2] == 0:
        return torch.cat([res_k, new_k], dim=-2), torch.cat([res_v, new_v], dim=-2)
    args = (kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v)
    if _use_compile(kq):
        if bits not in _compiled:
            _compiled[bits] = torch.compile(_eager[bits], dynamic=True, fullgraph=True)
        try:
            return _compiled[bits](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the eager path
            _state["compile_failed"] = True
            log.warning("torch.compile of the KV dequantize failed (%s); using the eager path", str(e).splitlines()[0])
    return _eager[bits](*args)
