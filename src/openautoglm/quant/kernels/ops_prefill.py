"""``torch.library`` custom ops of the prefill side of the weight-only and w8a8 layers (Triton kernels).

* ``openautoglm::wq_gemm``: prefill GEMM with dequantization fused into the tiles (:mod:`.triton_gemm`).
* ``openautoglm::dequant`` / ``dequant_cat``: codes to a dense 16-bit weight (one layer, or several layers that
  share an input stacked into one matrix) for the prefill's cuBLAS GEMM (:mod:`.triton_kernels`).
* ``openautoglm::quant_rows``: per-token int8 / e4m3 activation quantization (:mod:`.triton_kernels`).

Operands and formats as in :mod:`.ops` (which re-exports everything here); the launch helpers shared with the
decode ops (:func:`cdiv`, :func:`meta_strides`) live here so neither module imports the other's internals.
"""

from __future__ import annotations

import torch

FMT_INT4_PAIRS, FMT_INT4_K32, FMT_INT8, FMT_E4M3 = 4, 5, 8, 9
GEMM_TUNED: dict[tuple[int, int, int], dict] = {}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def meta_strides(s: torch.Tensor, z: torch.Tensor | None, groups_major: bool) -> tuple[int, int, int, int]:
    """(stride over rows n, stride over groups g) of the scales, then of the packed zero bytes."""
    sn, sg = (s.stride(1), s.stride(0)) if groups_major else (s.stride(0), s.stride(1))
    if z is None:
        return sn, sg, 0, 0
    zn, zg = (z.stride(1), z.stride(0)) if groups_major else (z.stride(0), z.stride(1))
    return sn, sg, zn, zg


def gemm_config(M: int, N: int, K: int, fmt: int, group: int) -> dict:
    cfg = GEMM_TUNED.get((fmt, N, K))
    if cfg is None:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    cfg = dict(cfg)
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group)
    while K % cfg["BLOCK_K"]:
        cfg["BLOCK_K"] //= 2
    return cfg


def launch_gemm(x, w, s, z, fmt, group, groups_major, y, cfg) -> torch.Tensor:
    from .triton_gemm import wq_gemm_kernel

    M, K = x.shape
    N = w.shape[0]
    sn, sg, zn, zg = meta_strides(s, z, groups_major)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    wq_gemm_kernel[grid](x, w, s, z if z is not None else s, y, M, N, K, x.stride(0), w.stride(0), sn, sg, zn, zg,
                         y.stride(0), FMT=fmt, GROUP=group, HAS_Z=z is not None, BLOCK_M=cfg["BLOCK_M"],
                         BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


@torch.library.custom_op("openautoglm::wq_gemm", mutates_args=())
def wq_gemm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, fmt: int, group: int,
            groups_major: bool) -> torch.Tensor:
    """``x (M, K) @ dequant(w)^T -> (M, N)`` in x's dtype with the dequantization fused (prefill)."""
    x = x.contiguous()
    M, K = x.shape
    y = torch.empty((M, w.shape[0]), device=x.device, dtype=x.dtype)
    return launch_gemm(x, w, s, z, fmt, group, groups_major, y, gemm_config(M, w.shape[0], K, fmt, group))


@wq_gemm.register_fake
def _(x, w, s, z, fmt, group, groups_major):
    return x.new_empty((x.shape[0], w.shape[0]))


def launch_dequant(w, s, z, fmt: int, group: int, groups_major: bool, out: torch.Tensor) -> torch.Tensor:
    """Dequantize codes ``w`` (``N`` rows) into ``out (N, K)`` (a 16-bit matrix, or a block of rows of a larger
    one: only its row stride is used) with the Triton kernel."""
    from .triton_kernels import dequant_kernel

    N, K = out.shape
    sn, sg, zn, zg = meta_strides(s, z, groups_major)
    row_bytes = w.stride(0) * w.element_size()
    if (w.stride(-1) != 1 or row_bytes % 16 or w.data_ptr() % 16 or N % 16 or w.shape[0] != N
            or out.stride(-1) != 1 or (out.stride(0) * out.element_size()) % 16 or out.data_ptr() % 16):
        raise ValueError(f"dequant needs 16-byte aligned rows of codes and of the output and N % 16 == 0, got codes "
                         f"{tuple(w.shape)} strides {w.stride()}, output {tuple(out.shape)} strides {out.stride()}")
    cpt = 16 if fmt == FMT_INT8 else 32
    tb = 8
    while (K // cpt) % tb:
        tb //= 2
    bn = 32 if N % 32 == 0 else 16
    dequant_kernel[(N // bn, K // (cpt * tb))](
        w, s, z if z is not None else s, out, N, K, row_bytes // 16, sn, sg, zn, zg, out.stride(0),
        FMT=fmt, GROUP=0 if group >= K else group, HAS_Z=z is not None, BLOCK_N=bn, TB=tb, num_warps=4)
    return out


@torch.library.custom_op("openautoglm::dequant", mutates_args=())
def dequant(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, fmt: int, group: int, groups_major: bool,
            in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``(N, K)`` weight of the given 16-bit dtype from int4 (``fmt`` 4: two a byte, 5: k32 order) or
    int8 (``fmt`` 8) codes (Triton)."""
    out = torch.empty((w.shape[0], in_features), device=w.device, dtype=dtype)
    return launch_dequant(w, s, z, fmt, group, groups_major, out)


@dequant.register_fake
def _(w, s, z, bits, group, groups_major, in_features, dtype):
    return w.new_empty((w.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("openautoglm::dequant_cat", mutates_args=())
def dequant_cat(ws: list[torch.Tensor], ss: list[torch.Tensor], zs: list[torch.Tensor | None], fmt: int, group: int,
                groups_major: bool, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Several weights of one K and format (q/k/v, gate/up) dequantized into ONE ``(sum N_i, K)`` matrix, weight
    ``i`` in rows ``[N_0 + .. + N_{i-1}, ...)``: the prefill then runs one GEMM for all of them (fewer, larger
    cuBLAS launches; the dequantized matrix is a transient, so nothing is kept)."""
    out = torch.empty((sum(w.shape[0] for w in ws), in_features), device=ws[0].device, dtype=dtype)
    off = 0
    for w, s, z in zip(ws, ss, zs):
        launch_dequant(w, s, z, fmt, group, groups_major, out[off:off + w.shape[0]])
        off += w.shape[0]
    return out


@dequant_cat.register_fake
def _(ws, ss, zs, fmt, group, groups_major, in_features, dtype):
    return ws[0].new_empty((sum(w.shape[0] for w in ws), in_features), dtype=dtype)


@torch.library.custom_op("openautoglm::quant_rows", mutates_args=())
def quant_rows(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of ``x (M, K)``: codes (int8 or e4m3) and float32 scales (M, 1)."""
    from .triton_kernels import quant_rows_kernel

    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    qmax = torch.finfo(torch.float8_e4m3fn).max if fp8 else 127.0
    block = max(16, 1 << (K - 1).bit_length())
    quant_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), QMAX=qmax, FP8=fp8, BLOCK=block,
                            num_warps=8 if block >= 4096 else 4)
    return q, s


@quant_rows.register_fake
def _(x, fp8):
    dt = torch.float8_e4m3fn if fp8 else torch.int8
    return x.new_empty(x.shape, dtype=dt), x.new_empty((x.shape[0], 1), dtype=torch.float32)
