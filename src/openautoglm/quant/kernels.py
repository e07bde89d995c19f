"""Device dispatch of the quantized matmuls: Triton/cuBLAS on CUDA, plain torch ops elsewhere.

Every function here is traceable by ``torch.compile`` without graph breaks: the Triton kernels are
wrapped as ``torch.library`` custom ops (opaque to dynamo, with fake implementations), and the only
Python branches are on the device and on the static number of rows ``M``.

Dispatch (``x: (..., K)`` flattened to ``(M, K)``):

=============  ==========================================  ==========================================
scheme         M <= DECODE_MAX_M (decode)                  larger M (prefill) / CPU
=============  ==========================================  ==========================================
w4             Triton ``wo_gemv`` (see DECODE_KERNEL)      Triton dequant + cuBLAS bf16 GEMM / torch
w8             Triton ``wo_matmul`` (codes in the dot)     Triton dequant + cuBLAS bf16 GEMM / torch
w8a8 (int8)    Triton ``wo_matmul`` (weight-only)          per-token int8 + ``torch._int_mm``
w8a8-fp8       Triton ``wo_matmul`` on the e4m3 weights    per-token e4m3 + ``torch._scaled_mm`` rowwise
static         Triton ``wo_matmul`` (weight-only)          static-scale int8 + ``torch._int_mm``
=============  ==========================================  ==========================================

At decode the activations are not quantized: the step is bound by reading the weights, and the
16-bit activations are more accurate.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .math import quantize_per_token, unpack_int4

log = logging.getLogger(__name__)
DECODE_MAX_M = 16


def _probe_triton() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from . import triton_kernels  # noqa: F401
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


# ----------------------------------------------------------------------------- Triton custom ops

@torch.library.custom_op("openautoglm::wo_matmul", mutates_args=())
def wo_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
              group: int) -> torch.Tensor:
    """``x (M, K) @ dequant(w)^T -> (M, N)`` in x's dtype (Triton, small M)."""
    from . import triton_kernels as tk

    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton_cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    tk.wo_matmul_tuned[grid](x, w, s, z if z is not None else s, y, M, N, K, x.stride(0), w.stride(0),
                             s.stride(0), z.stride(0) if z is not None else 0, y.stride(0), GROUP=group, BITS=bits,
                             HAS_Z=z is not None, BLOCK_M=16)
    return y


@wo_matmul.register_fake
def _(x, w, s, z, bits, group):
    return x.new_empty((x.shape[0], w.shape[0]))


def gemv_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes as ``wo_gemv`` reads them: packed int4 ``(N, K/2)`` uint8 viewed as int32 ``(N, K/8)``."""
    return w.view(torch.int32) if bits == 4 else w


@torch.library.custom_op("openautoglm::wo_gemv", mutates_args=())
def wo_gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
            group: int) -> torch.Tensor:
    """``x (M, K) @ dequant(w)^T -> (M, N)``, decode GEMV (Triton v2: wide code loads, fp32 FMA at M=1)."""
    from . import triton_kernels as tk

    M, K = x.shape
    N = w.shape[0]
    wq = gemv_weight(w, bits)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton_cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    tk.wo_gemv_tuned[grid](x, wq, s, z if z is not None else s, y, M, N, K, x.stride(0), wq.stride(0), s.stride(0),
                           z.stride(0) if z is not None else 0, y.stride(0), GROUP=group, BITS=bits,
                           HAS_Z=z is not None, BLOCK_M=1 if M == 1 else 16)
    return y


@wo_gemv.register_fake
def _(x, w, s, z, bits, group):
    return x.new_empty((x.shape[0], w.shape[0]))


# Decode kernel of the weight-only paths on CUDA: "v2" (wo_gemv) or "v1" (wo_matmul, codes in the dot), by
# bit width. Measured per layer on the H100 (K=4096, N=11008, CUDA graph, benchmarks/quant_kernels_gpu.py):
# w4 v2 25 / 44 / 44 us at M=1/8/16 vs v1 50 / 66 / 82 us; w8 v1 19 / 20 / 20 us vs v2 21 / 25 / 25 us.
DECODE_KERNEL = {4: "v2", 8: "v1"}


def _decode_op(bits: int):
    return wo_gemv if DECODE_KERNEL.get(bits, "v1") == "v2" else wo_matmul


@torch.library.custom_op("openautoglm::dequant", mutates_args=())
def dequant_triton(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, group: int,
                   in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``(N, K)`` weight of the given 16-bit dtype (Triton)."""
    from . import triton_kernels as tk

    N, K = w.shape[0], in_features
    out = torch.empty((N, K), device=w.device, dtype=dtype)
    grid = (triton_cdiv(N, 32), triton_cdiv(K, 256))
    tk.dequant_kernel[grid](w, s, z if z is not None else s, out, N, K, w.stride(0), s.stride(0),
                            z.stride(0) if z is not None else 0, out.stride(0), GROUP=group, BITS=bits, HAS_Z=z is not None, BLOCK_N=32, BLOCK_K=256, num_warps=4)
    return out


@dequant_triton.register_fake
def _(w, s, z, bits, group, in_features, dtype):
    return w.new_empty((w.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("openautoglm::quant_rows", mutates_args=())
def quant_rows(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of ``x (M, K)``: codes (int8 or e4m3) and float32 scales (M, 1)."""
    from . import triton_kernels as tk

    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    qmax = torch.finfo(torch.float8_e4m3fn).max if fp8 else 127.0
    block = max(16, 1 << (K - 1).bit_length())
    tk.quant_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), QMAX=qmax, FP8=fp8, BLOCK=block,
                               num_warps=8 if block >= 4096 else 4)
    return q, s


@quant_rows.register_fake
def _(x, fp8):
    dt = torch.float8_e4m3fn if fp8 else torch.int8
    return x.new_empty(x.shape, dtype=dt), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- torch-op references

def unpack_zero(z: torch.Tensor) -> torch.Tensor:
    """Zero-point codes packed two rows a byte ``(N/2, G)`` -> ``(N, G)`` uint8 (row 2i from the high nibble)."""
    return unpack_int4(z.t()).t()


def dequant_torch(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, group: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Dense ``(N, K)`` weight from codes ``w``, scales ``s (N, K // group)`` and packed zero codes, torch ops."""
    q = unpack_int4(w) if bits == 4 else w
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
    return x.is_cuda and kernel != "torch" and TRITON_OK


# ----------------------------------------------------------------------------- public dispatch

def weight_only_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
                       group: int, bias: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """``x (..., K) -> (..., N)`` through quantized weights (int8, packed int4 or e4m3 codes)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if _use_triton(x2, kernel) and x.dtype in (torch.bfloat16, torch.float16):
        if x2.shape[0] <= DECODE_MAX_M:
            y = _decode_op(bits)(x2.contiguous(), w, s, z, bits, group)
        else:
            y = F.linear(x2, dequant_triton(w, s, z, bits, group, K, x.dtype))
    else:
        y = F.linear(x2, dequant_torch(w, s, z, bits, group, x.dtype))
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


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
    if _use_triton(x2, kernel) and M <= DECODE_MAX_M and x.dtype in (torch.bfloat16, torch.float16):
        y = wo_matmul(x2.contiguous(), w, ws, None, 8, K)
    else:
        if act_scale is not None:
            xs = act_scale.float().reshape(1, 1)
            xq = torch.clamp(torch.round(x2.float() / xs), -127, 127).to(torch.int8)
        elif _use_triton(x2, kernel) and x.dtype in (torch.bfloat16, torch.float16):
            xq, xs = quant_rows(x2.contiguous(), False)
        else:
            xq, xs = quantize_per_token(x2)
        acc = _int8_gemm(xq, w)
        y = (acc.float() * xs * ws.float().reshape(1, -1)).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def fp8_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
               kernel: str = "auto") -> torch.Tensor:
    """e4m3 weights ``w (N, K)`` with per-channel scales ``ws (N, 1)``; per-token e4m3 activations and
    ``torch._scaled_mm`` (row-wise scales) on FP8 GPUs; an emulation with the same rounding elsewhere."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    fast = _use_triton(x2, kernel) and x.dtype in (torch.bfloat16, torch.float16)
    if fast and M <= DECODE_MAX_M:
        y = wo_matmul(x2.contiguous(), w, ws, None, 8, K)
    elif fast and FP8_OK:
        xq, xs = quant_rows(x2.contiguous(), True)
        pad = (-M) % 16
        if pad:
            xq, xs = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn), F.pad(xs, (0, 0, 0, pad), value=1.0)
        y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws.float().reshape(1, -1), out_dtype=x.dtype)[:M]
    else:
        from .math import to_fp8

        xq, xs = to_fp8(x2)
        y = ((xq.float() * xs) @ (w.float() * ws.float().reshape(-1, 1)).t()).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


@functools.lru_cache(maxsize=8)
def fastest_w8a8(device: torch.device | str) -> str:
    """``"w8a8-fp8"`` or ``"w8a8"``: whichever of the e4m3 and int8 GEMM paths (activation quantization
    included) runs a (2048 x 4096) x (4096 x 4096) product faster on ``device``; int8 without FP8."""
    device = torch.device(device)
    if device.type != "cuda" or not fp8_supported(device) or not triton_available():
        return "w8a8"
    from .math import quantize, to_fp8

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
