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


def _read(up, kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v):
    k = (up(kq).float() * ks.float() + km.float()).to(res_k.dtype)  # (b, h, n_blocks, d, group)
    b, h, nb, d, g = k.shape
    k = k.transpose(-1, -2).reshape(b, h, nb * g, d)
    v = (up(vq).float() * vs.float() + vm.float()).to(res_v.dtype).flatten(-2)  # (b, h, n, d)
    return torch.cat([k, res_k, new_k], dim=-2), torch.cat([v, res_v, new_v], dim=-2)


# One top-level function (one code object) per bit width: dynamo keeps its compiled graphs and its
# recompile limit per code object, so the widths do not evict each other. ``bits`` never enters the
# traced code as a number (torch 2.11 traced it as a symbol under dynamic shapes and failed on ``1 << s``).
def _read8(kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v):
    return _read(packing.UNPACK[8], kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v)


def _read4(kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v):
    return _read(packing.UNPACK[4], kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v)


def _read2(kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v):
    return _read(packing.UNPACK[2], kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v)


_eager = {8: _read8, 4: _read4, 2: _read2}
_compiled: dict[int, object] = {}
_state = {"compile_failed": False}


def _use_compile(t: torch.Tensor) -> bool:
    mode = os.environ.get("OPENAUTOGLM_KV_COMPILE", "1")  # 0: never, 1: on CUDA, force: everywhere
    return not _state["compile_failed"] and (mode == "force" or (mode != "0" and t.is_cuda))


def _standard(t: torch.Tensor) -> bool:
    """True if ``t`` has exactly the strides of a contiguous tensor of its shape."""
    expected, acc = [], 1
    for size in reversed(t.shape):
        expected.append(acc)
        acc *= size
    return tuple(reversed(expected)) == t.stride()


def materialize(kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v, bits: int):
    """All keys and values of one layer: dequantized blocks, then the full-precision window, then new tokens.

    kq : (batch, heads, n_blocks, head_dim, group * bits // 8) uint8; ks, km : (..., 1) float16
    vq : (batch, heads, n_q, head_dim // vgroup, vgroup * bits // 8) uint8; vs, vm : (..., 1) float16
    res_k, res_v : (batch, heads, r, head_dim) window; new_k, new_v : (batch, heads, t, head_dim)
    returns keys, values: (batch, heads, n_q + r + t, head_dim) of the window's dtype
    """
    if vq.shape[2] == 0:
        return torch.cat([res_k, new_k], dim=-2), torch.cat([res_v, new_v], dim=-2)
    # contiguous inputs: the attention's K/V are transposed views whose strides would otherwise be
    # guarded on and recompile the kernel between prefill chunks and decode steps
    # (``clone(contiguous_format)``: ``contiguous()`` keeps the arbitrary strides of size-1 dimensions)
    new_k, new_v = (t if _standard(t) else t.clone(memory_format=torch.contiguous_format) for t in (new_k, new_v))
    args = (kq, ks, km, res_k, new_k, vq, vs, vm, res_v, new_v)
    if _use_compile(kq):
        if bits not in _compiled:
            # Sizes 0/1 are specialised and equal sizes duck-typed, so a kernel sees a few graphs per
            # width (prefill chunk vs one token, batch 1 vs n, ...): make room (raising only).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            _compiled[bits] = torch.compile(_eager[bits], dynamic=True, fullgraph=True)
        try:
            return _compiled[bits](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the eager path
            _state["compile_failed"] = True
            log.warning("torch.compile of the KV dequantize failed (%s); using the eager path", str(e).splitlines()[0])
    return _eager[bits](*args)
