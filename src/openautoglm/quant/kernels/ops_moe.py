"""``torch.library`` custom ops of the quantized experts (:class:`~openautoglm.quant.experts.QuantExperts`).

Operands: a stack of ``E`` experts as one quantized matrix of ``E * N`` rows (expert ``e`` at rows ``[e N, (e+1) N)``;
codes ``w``, scales ``s``, packed zero points ``z`` in either metadata layout, as :mod:`.ops`), ``fmt`` 5 (int4 k32
order), 8 (int8) or 9 (e4m3).

* ``openautoglm::moe_gemv`` (decode): ``y[p] = x[p // xdiv] @ W[idx[p]]^T`` for every (token, expert) pair ``p`` in
  ONE launch of the decode kernel in its ``EXPERTS`` mode (:func:`.triton_decode.decode_kernel`): each program reads
  its expert id from ``idx`` on the device and offsets its pointers, so only the routed experts' codes are read and
  there is no host sync (CUDA-graph safe). ``xdiv`` = top-k when ``x`` holds the tokens (first projection), 1 when it
  holds one row per pair (second projection).
* ``openautoglm::moe_grouped_mm`` (prefill): rows of ``x`` sorted by expert, ``offs`` the cumulative row counts per
  expert; the stack is dequantized to 16 bits (Triton, one pass) and multiplied per expert by ``torch._grouped_mm``
  (bf16 on sm_90+, where torch has it), else by one GEMM per expert holding rows. Inside the op, so
  ``torch.compile(fullgraph=True)`` sees one opaque call whichever runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import _MASK16, _XOR15, _ascending, _fma_t, cdiv, dequant
from .ops_prefill import FMT_E4M3, FMT_INT4_K32, meta_strides

# prefill GEMM of the dequantized experts: "auto" (torch._grouped_mm on CUDA sm_90+ in bf16, else a loop of GEMMs),
# "grouped" (torch._grouped_mm wherever torch has it: the CPU tests), "loop"
GROUPED_MM = "auto"


def _expert_meta(s: torch.Tensor, z: torch.Tensor | None, n: int, groups_major: bool):
    """Expert 0's scale / zero views (their strides are every expert's) and the element offsets between experts."""
    if groups_major:
        s0, z0 = s[:, :n], (z[:, : n // 2] if z is not None else None)
        return s0, z0, n * s.stride(1), (n // 2) * z.stride(1) if z is not None else 0
    s0, z0 = s[:n], (z[: n // 2] if z is not None else None)
    return s0, z0, n * s.stride(0), (n // 2) * z.stride(0) if z is not None else 0


def launch_moe_gemv(x, w, s, z, idx, xdiv: int, fmt: int, group: int, groups_major: bool, experts: int,
                    y: torch.Tensor) -> torch.Tensor:
    from .triton_decode import decode_kernel

    K = x.shape[1]
    n = w.shape[0] // experts
    pairs = idx.numel()
    vec = 16 if fmt == FMT_INT4_K32 else 8
    if w.stride(-1) != 1 or (w.stride(0) * w.element_size()) % vec or w.data_ptr() % 16:
        raise ValueError(f"decode kernels need rows of codes aligned to {vec} bytes, got strides {w.stride()}")
    s0, z0, se, ze = _expert_meta(s, z, n, groups_major)
    sn, sg, zn, zg = meta_strides(s0, z0, groups_major)
    cfg = dict(R=4, T=_fma_t(K, fmt, 8), num_warps=4)
    rb = cfg["num_warps"] * 32 // cfg["T"]
    n_blocks = cdiv(n, cfg["R"] * rb)
    zz = z if z is not None else s
    decode_kernel[(n_blocks, 1, pairs)](
        x, w, s, zz, y, y, y, 1, n, K, 1, x.stride(0), w.stride(0) * w.element_size() // vec, sn, sg, zn, zg,
        y.stride(0), _MASK16, _XOR15, w, s, zz, sg, zg, n, w, s, zz, sg, zg, 0,
        idx, n * w.stride(0), se, ze, xdiv,
        FMT=4 if fmt == FMT_INT4_K32 else fmt, GROUP=0 if group >= K and z is None else group, HAS_Z=z is not None,
        BLOCK_M=1,
        R=cfg["R"], RB=rb, T=cfg["T"], SPLIT=False, ASCENDING=_ascending(), NW=1, PF=0, EXPERTS=True,
        num_warps=cfg["num_warps"], num_stages=1)
    return y


@torch.library.custom_op("openautoglm::moe_gemv", mutates_args=())
def moe_gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, idx: torch.Tensor,
             xdiv: int, fmt: int, group: int, groups_major: bool, experts: int) -> torch.Tensor:
    """``x (rows, K)``, ``idx (P,)`` expert ids -> ``y (P, N)``: row ``p`` is ``x[p // xdiv]`` times expert
    ``idx[p]``'s dequantized ``(N, K)`` weight (decode; see the module docstring)."""
    x = x.contiguous()
    idx = idx.reshape(-1).to(torch.int32).contiguous()
    y = torch.empty((idx.numel(), w.shape[0] // experts), device=x.device, dtype=x.dtype)
    return launch_moe_gemv(x, w, s, z, idx, xdiv, fmt, group, groups_major, experts, y)


@moe_gemv.register_fake
def _(x, w, s, z, idx, xdiv, fmt, group, groups_major, experts):
    return x.new_empty((idx.numel(), w.shape[0] // experts))


def dequant_stack(w, s, z, fmt: int, group: int, groups_major: bool, in_features: int, dtype) -> torch.Tensor:
    """The whole stack as a dense ``(E N, K)`` 16-bit matrix: the Triton dequantize (int4 / int8), or torch ops for
    the e4m3 codes (one hardware conversion and a per-row scale)."""
    if fmt == FMT_E4M3:
        return (w.to(torch.float32) * s.float()).to(dtype)
    return dequant(w, s, z, fmt, group, groups_major, in_features, dtype)


def _use_grouped_mm(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or GROUPED_MM == "loop":
        return False
    if GROUPED_MM == "grouped":
        return True
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


@torch.library.custom_op("openautoglm::moe_grouped_mm", mutates_args=())
def moe_grouped_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, offs: torch.Tensor,
                   fmt: int, group: int, groups_major: bool, experts: int) -> torch.Tensor:
    """``x (S, K)`` rows sorted by expert, ``offs (E,)`` int32 cumulative rows per expert -> ``(S, N)`` (prefill)."""
    K = x.shape[1]
    n = w.shape[0] // experts
    wd = dequant_stack(w, s, z, fmt, group, groups_major, K, x.dtype).view(experts, n, K)
    if _use_grouped_mm(x):
        return torch._grouped_mm(x.contiguous(), wd.transpose(-2, -1), offs=offs.to(torch.int32))
    y = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync for the whole loop
        if end > start:
            y[start:end] = F.linear(x[start:end], wd[e])
        start = end
    return y


@moe_grouped_mm.register_fake
def _(x, w, s, z, offs, fmt, group, groups_major, experts):
    return x.new_empty((x.shape[0], w.shape[0] // experts))
