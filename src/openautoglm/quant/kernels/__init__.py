"""Device dispatch of the quantized matmuls: Triton/cuBLAS on CUDA, plain torch ops elsewhere.

Every function here is traceable by ``torch.compile`` without graph breaks: the Triton kernels are
``torch.library`` custom ops (:mod:`.ops`, opaque to dynamo, with fake implementations), and the only
Python branches are on the device and on the static number of rows ``M``.

Dispatch (``x: (..., K)`` flattened to ``(M, K)``):

=============  ==========================================  ==========================================
scheme         M <= DECODE_MAX_M (decode)                  larger M (prefill) / CPU
=============  ==========================================  ==========================================
w4, w8         ``wq_gemv`` (Triton, split-K)               ``wq_gemm`` fused dequant-GEMM (or dequant +
                                                           cuBLAS, see PREFILL_PATH) / torch
w8a8 (int8)    ``wq_gemv`` on the int8 weights             per-token int8 + ``torch._int_mm``
w8a8-fp8       ``wq_gemv`` on the e4m3 weights             per-token e4m3 + ``torch._scaled_mm`` rowwise
static         ``wq_gemv`` on the int8 weights             static-scale int8 + ``torch._int_mm``
=============  ==========================================  ==========================================

At decode the activations are not quantized: the step is bound by reading the weights, and the
16-bit activations are more accurate. Under ``torch.compile`` the per-token activation quantization of
the prefill is written in torch ops, so inductor fuses it into the op that produced ``x`` (RMSNorm);
eagerly it is one Triton kernel.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ..math import quantize, quantize_per_token, to_fp8, unpack_int4, unpack_int4_k32
from . import ops

log = logging.getLogger(__name__)
DECODE_MAX_M = 16


def _probe_triton() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from . import triton_gemm, triton_gemv, triton_kernels  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no Triton here"
        log.info("Triton kernels unavailable (%s); using torch ops", e)
        return False
    return True


def _probe_fp8() -> bool:
    return (torch.cuda.is_available() and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability() >= (8, 9))


# Probed once at import so the traced forward reads plain constants (no graph breaks under torch.compile).
TRITON_OK = _probe_triton()
FP8_OK = _probe_fp8()


def triton_available() -> bool:
    return TRITON_OK


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """CUDA device of compute capability >= 8.9 with ``torch._scaled_mm`` (the first GPU is probed)."""
    return FP8_OK


# Prefill (M > DECODE_MAX_M) of the weight-only formats on CUDA: "fused" (ops.wq_gemm, dequantization inside
# the GEMM tiles) or "dequant" (Triton dequantize to 16 bits, then cuBLAS), by bit width. Measured per layer on
# the H100 (M=2048, K=4096, N=11008; benchmarks/results/quant/kernels_gpu.json): bf16 245 us; dequant + cuBLAS
# 296 us (w4) and 294 us (w8); the fused Triton GEMM 572 / 509 us (best of six tile shapes). So: dequant.
PREFILL_PATH = {4: "dequant", 8: "dequant"}


# ----------------------------------------------------------------------------- torch-op references

def unpack_zero(z: torch.Tensor) -> torch.Tensor:
    """Zero-point codes packed two rows a byte ``(N/2, G)`` -> ``(N, G)`` uint8 (row 2i from the high nibble)."""
    return unpack_int4(z.t()).t()


def dequant_torch(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, group: int,
                  dtype: torch.dtype, groups_major: bool = False, k32: bool = False) -> torch.Tensor:
    """Dense ``(N, K)`` weight from codes ``w``, scales ``s (N, K // group)`` and packed zero codes ``(N/2, G)``
    (``groups_major``: ``s (G, N)``, ``z (G, N/2)``; ``k32``: int4 codes in the k32 order), torch ops:
    ``(q - z) * s`` in ``dtype``."""
    if groups_major:
        s, z = s.t(), (z.t() if z is not None else None)
    q = (unpack_int4_k32(w) if k32 else unpack_int4(w)) if bits == 4 else w
    N, K = q.shape
    qf = q.to(dtype if dtype != torch.float8_e4m3fn else torch.float32).reshape(N, K // group, group)
    sf = s.to(qf.dtype).unsqueeze(-1)
    if z is not None:
        out = (qf - unpack_zero(z).to(qf.dtype).unsqueeze(-1)) * sf
    elif bits == 4:
        out = (qf - 8) * sf
    else:
        out = qf * sf
    return out.reshape(N, K).to(dtype)


def _use_triton(x: torch.Tensor, kernel: str) -> bool:
    return x.is_cuda and kernel != "torch" and TRITON_OK and x.dtype in (torch.bfloat16, torch.float16)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------- public dispatch

def weight_only_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
                       group: int, bias: torch.Tensor | None = None, kernel: str = "auto",
                       groups_major: bool = False, k32: bool = False) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` through grouped int8 / packed int4 codes (layouts as in :mod:`.ops`)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    fmt = ops.FMT_INT4_K32 if (bits == 4 and k32) else bits
    if _use_triton(x2, kernel):
        if x2.shape[0] <= DECODE_MAX_M:
            y = ops.wq_gemv(x2, w, s, z, fmt, group, groups_major)
        elif PREFILL_PATH.get(bits) == "fused" and fmt != ops.FMT_INT4_K32:
            y = ops.wq_gemm(x2, w, s, z, bits, group, groups_major)
        else:
            y = F.linear(x2, ops.dequant(w, s, z, fmt, group, groups_major, K, x.dtype))
    else:
        y = F.linear(x2, dequant_torch(w, s, z, bits, group, x.dtype, groups_major, k32))
    return _finish(y, x, bias)


def _fused_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and TRITON_OK and x.dtype in (torch.bfloat16, torch.float16)


def fused_linears(x: torch.Tensor, mods) -> list[torch.Tensor] | None:
    """Several quantized Linears that read the same ``x`` (q/k/v, gate/up) computed together, or ``None`` where
    that does not apply (CPU, mixed formats or classes, a kernel choice other than Triton, batch > 1 decode)
    and the caller runs the modules one by one:

    * ONE activation row (decode): one launch of the decode kernel over all weights (``ops.wq_gemv_multi``);
    * more than ``DECODE_MAX_M`` rows (prefill) of weight-only layers (w4 / w8): all weights dequantized into one
      ``(sum N_i, K)`` matrix (``ops.dequant_cat``) and ONE cuBLAS GEMM instead of one per layer.

    Decided from static facts (module classes and configs, the number of rows), so ``torch.compile`` traces it
    without a graph break. Returns the modules' outputs ``(..., N_i)`` (views of one ``(..., sum N_i)`` result).
    """
    if not _fused_ok(x):
        return None
    K = x.shape[-1]
    M = x.numel() // K
    if M == 1:
        ops_ = [getattr(m, "decode_operands", lambda: None)() for m in mods]
        if any(o is None for o in ops_) or len({o[3:] for o in ops_}) != 1 or ops_[0][3] not in (ops.FMT_INT4_K32, 8, 9):
            return None
        fmt, group, gm = ops_[0][3:]
        y = ops.wq_gemv_multi(x.reshape(1, K), [o[0] for o in ops_], [o[1] for o in ops_], [o[2] for o in ops_], fmt,
                              group, gm)
    elif M > DECODE_MAX_M and FUSE_PREFILL:
        ops_ = prefill_group(mods)
        if ops_ is None:
            return None
        fmt, group, gm = ops_[0][3:]
        w = ops.dequant_cat([o[0] for o in ops_], [o[1] for o in ops_], [o[2] for o in ops_], fmt, group, gm, K, x.dtype)
        y = F.linear(x.reshape(M, K), w)
    else:
        return None
    outs = []
    for part, m in zip(torch.split(y, [m.out_features for m in mods], dim=-1), mods):
        if m.bias is not None:
            part = part + m.bias
        outs.append(part.reshape(*x.shape[:-1], m.out_features))
    return outs



# Prefill of q/k/v and gate/up of weight-only layers through one dequantized matrix and one GEMM
# (fused_linears); False: one dequantize + GEMM per layer (benchmarks compare both in one run).
FUSE_PREFILL = True


def prefill_group(mods) -> list[tuple] | None:
    """``dequant_operands()`` of every module when they can be dequantized into one matrix (all weight-only,
    same format, group size and scale layout, Triton kernels allowed), else ``None``."""
    ops_ = [getattr(m, "dequant_operands", lambda: None)() for m in mods]
    if len(ops_) < 2 or any(o is None for o in ops_) or len({o[3:] for o in ops_}) != 1:
        return None
    return ops_


def _int8_gemm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 ``(M, K) x (N, K)^T -> int32 (M, N)``; ``torch._int_mm`` where it applies, else exact fallback."""
    M = xq.shape[0]
    if xq.is_cuda:
        pad = max(0, 17 - M)  # _int_mm on CUDA needs M > 16
        if pad:
            xq = F.pad(xq, (0, 0, 0, pad))
        return torch._int_mm(xq, wq.t())[:M]
    if hasattr(torch, "_int_mm"):
        return torch._int_mm(xq, wq.t())
    return (xq.double() @ wq.double().t()).to(torch.int32)  # pragma: no cover - very old torch


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
                act_scale: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """int8 weights ``w (N, K)`` with per-channel scales ``ws (N, 1)``; activations quantized per token
    (dynamic) or with the fixed ``act_scale`` (static), then an int8 GEMM."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    fast = _use_triton(x2, kernel)
    if fast and M <= DECODE_MAX_M:
        return _finish(ops.wq_gemv(x2, w, ws, None, 8, K, False), x, bias)
    if act_scale is not None:
        xs = act_scale.float().reshape(1, 1)
        xq = torch.clamp(torch.round(x2.float() / xs), -127, 127).to(torch.int8)
    elif fast and not torch.compiler.is_compiling():
        xq, xs = ops.quant_rows(x2.contiguous(), False)
    else:  # torch ops: under torch.compile inductor fuses this into the producer of x
        xq, xs = quantize_per_token(x2)
    acc = _int8_gemm(xq, w)
    return _finish((acc.float() * xs * ws.float().reshape(1, -1)).to(x.dtype), x, bias)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
               kernel: str = "auto") -> torch.Tensor:
    """e4m3 weights ``w (N, K)`` with per-channel scales ``ws (N, 1)``; per-token e4m3 activations and
    ``torch._scaled_mm`` (row-wise scales) on FP8 GPUs; an emulation with the same rounding elsewhere."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    fast = _use_triton(x2, kernel)
    if fast and M <= DECODE_MAX_M:
        y = ops.wq_gemv(x2, w, ws, None, 9, K, False)
    elif fast and FP8_OK:
        if torch.compiler.is_compiling():  # torch ops: fused by inductor into the producer of x (RMSNorm)
            xq, xs = to_fp8(x2)
        else:
            xq, xs = ops.quant_rows(x2.contiguous(), True)
        pad = (-M) % 16
        if pad:
            xq, xs = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn), F.pad(xs, (0, 0, 0, pad), value=1.0)
        y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws.float().reshape(1, -1), out_dtype=x.dtype)[:M]
    else:
        xq, xs = to_fp8(x2)
        y = ((xq.float() * xs) @ (w.float() * ws.float().reshape(-1, 1)).t()).to(x.dtype)
    return _finish(y, x, bias)


@functools.lru_cache(maxsize=8)
def fastest_w8a8(device: torch.device | str) -> str:
    """``"w8a8-fp8"`` or ``"w8a8"``: whichever of the e4m3 and int8 GEMM paths (activation quantization
    included) runs a (2048 x 4096) x (4096 x 4096) product faster on ``device``; int8 without FP8."""
    device = torch.device(device)
    if device.type != "cuda" or not fp8_supported(device) or not triton_available():
        return "w8a8"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2048, 4096, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(4096, 4096, device=device, generator=g)
    qi = quantize(w, 8)
    wq8, ws8 = qi.q, qi.scale
    wf8, wsf = to_fp8(w)
    runs = {"w8a8": lambda: w8a8_linear(x, wq8, ws8), "w8a8-fp8": lambda: fp8_linear(x, wf8, wsf)}
    times = {}
    for name, fn in runs.items():
        try:
            for _ in range(3):
                fn()
        except Exception as e:  # noqa: BLE001 - a path that fails here is not picked
            log.warning("w8a8 path %s failed on %s: %s", name, device, e)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        times[name] = start.elapsed_time(end) / 20
    best = min(times, key=times.get) if times else "w8a8"
    log.info("w8a8 GEMM timing on %s: %s -> %s", torch.cuda.get_device_name(device),
             {k: f"{v:.3f} ms" for k, v in times.items()}, best)
    return best
