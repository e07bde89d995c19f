"""``torch.library`` custom ops over the weight-only Triton kernels, with their launch configurations.

The ops are opaque to ``torch.compile`` (fake implementations give the output shapes), so a compiled
model calls them without graph breaks and CUDA graphs capture them as plain kernel launches.

* ``openautoglm::wq_gemv``: decode GEMV, M <= 16 (:mod:`.triton_decode`, :mod:`.triton_gemv`).
* ``openautoglm::wq_gemv_multi``: several weights that read the same activations (q/k/v, gate/up) in one launch.
* the prefill ops ``wq_gemm``, ``dequant``, ``dequant_cat`` and ``quant_rows`` live in :mod:`.ops_prefill` and
  are re-exported here.

All take the codes ``w`` (int4 two a byte ``(N, K/2)`` uint8, int8 ``(N, K)`` or e4m3 ``(N, K)``), the scales
``s`` and the optional packed zero points ``z`` in either layout (``groups_major``: ``s (G, N)``,
``z (G, N/2)``; else ``s (N, G)``, ``z (N/2, G)``). ``fmt`` is 4, 5 (int4 k32 order), 8 or 9 (e4m3).

Launch configurations come from :data:`GEMV_TUNED` (measured on the H100, keyed by format, row bucket and
shape) or from a heuristic for shapes not in the table.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..._util.scratch import tickets  # noqa: F401  (ops.tickets: QuantLinear allocates them on a move)
from .ops_prefill import (  # noqa: F401
    FMT_E4M3,
    FMT_INT4_K32,
    FMT_INT4_PAIRS,
    FMT_INT8,
    GEMM_TUNED,
    cdiv,
    dequant,
    dequant_cat,
    gemm_config,
    launch_dequant,
    launch_gemm,
    quant_rows,
    wq_gemm,
)
from .ops_prefill import meta_strides as _meta_strides


def _load_tuned() -> dict[tuple[int, int, int, int], dict]:
    """(fmt, rows bucket 1|16, N, K) -> launch config: the best of the per-layer sweep of
    ``benchmarks/quant/kernels_gpu.py`` on the H100 (7B and 1B Llama shapes), shipped as ``gemv_tuned.json``."""
    path = Path(__file__).with_name("gemv_tuned.json")
    if not path.exists():
        return {}
    return {tuple(int(v) for v in k.split(",")): c for k, c in json.loads(path.read_text())["gemv"].items()}


GEMV_TUNED: dict[tuple[int, int, int, int], dict] = _load_tuned()


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4


@functools.lru_cache(maxsize=1)
def _ascending() -> bool:
    """Triton < 3.7 spreads threads over tied load axes in ascending order (see ``decode_kernel``)."""
    import triton

    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 7)
_MASK16, _XOR15 = 0x000F0000, 0x4B400000  # constants of triton_decode's code conversions

def _bucket(m: int) -> int:
    return 1 if m == 1 else 16


def _split(n_tiles: int, n_blocks: int, target: int) -> int:
    split = max(1, min(n_tiles, cdiv(target, n_blocks)))
    per = cdiv(n_tiles, split)
    return cdiv(n_tiles, per)  # no empty splits


def _fma_t(K: int, fmt: int, t: int) -> int:
    """Largest thread count along K (<= t) whose iteration (32 int4 / 8 int8 codes a thread) divides K."""
    kt = 32 if fmt == FMT_INT4_K32 else 8
    while t > 1 and K % (kt * t):
        t //= 2
    return t


def dot_ok(K: int, fmt: int, group: int, tw: int = 16) -> bool:
    """The tensor-core decode kernel takes one scale group per iteration of ``8 tw`` (int4) / ``4 tw`` codes."""
    kb = (8 if fmt == FMT_INT4_K32 else 4) * tw
    return K % kb == 0 and (group >= K or group % kb == 0)


def gemv_config(M: int, N: int, K: int, fmt: int, group: int, device: torch.device) -> dict:
    """Kernel, block sizes, split and warps of :func:`wq_gemv` for this problem: the tuned table of the H100
    (``gemv_tuned.json``), else a heuristic. ``kernel``: ``"fma"`` (:func:`.triton_decode.decode_kernel`),
    ``"dot"`` (:func:`.triton_decode.decode_dot_kernel`) or ``"v1"`` (:mod:`.triton_gemv`: int4 two codes a
    byte -- checkpoints written before the k32 order --, int8 and e4m3; at one activation row it read int8 and
    e4m3 weights 10-20% faster than ``"fma"`` on the H100, so it stays their M = 1 kernel)."""
    cfg = GEMV_TUNED.get((fmt, _bucket(M), N, K))
    if cfg is not None:
        kind = {"pairs": "v1"}.get(cfg.get("kernel", "v1"), cfg.get("kernel", "v1"))
        if ((kind == "dot" and not dot_ok(K, fmt, group, cfg["TW"])) or (kind == "v1" and fmt == FMT_INT4_K32)
                or (kind != "v1" and fmt == FMT_INT4_PAIRS)):
            cfg = None
        else:
            cfg = dict(cfg, kernel=kind)
    if cfg is None:
        if fmt == FMT_INT4_PAIRS or (fmt != FMT_INT4_K32 and (M == 1 or not dot_ok(K, fmt, group))):
            dot = M > 1
            bk = 256
            if dot:
                bk = min(bk, group)
            while K % bk:
                bk //= 2
            cfg = dict(kernel="v1", BLOCK_N=64 if dot else 16, BLOCK_K=bk, num_warps=4, num_stages=2, DOT=dot)
        elif M == 1 or not dot_ok(K, fmt, group):
            cfg = dict(kernel="fma", R=4, T=8, num_warps=4)
        else:
            cfg = dict(kernel="dot", BLOCK_N=64, TW=16, num_warps=4, num_stages=2)
    cfg = dict(cfg)
    kind = cfg["kernel"]
    if kind == "fma":
        cfg["T"] = _fma_t(K, fmt, cfg["T"])
        n_blocks = cdiv(N, cfg["R"] * cfg["num_warps"] * 32 // cfg["T"])
        n_tiles = K // ((32 if fmt == FMT_INT4_K32 else 8) * cfg["T"])
    elif kind == "dot":
        n_blocks = cdiv(N, cfg["BLOCK_N"])
        n_tiles = K // ((8 if fmt == FMT_INT4_K32 else 4) * cfg["TW"])
    else:
        n_blocks, n_tiles = cdiv(N, cfg["BLOCK_N"]), K // cfg["BLOCK_K"]
    if "SPLIT_K" not in cfg:
        cfg["SPLIT_K"] = _split(n_tiles, n_blocks, cfg.pop("waves", 4) * sm_count(device))
    cfg["SPLIT_K"] = max(1, min(cfg["SPLIT_K"], n_tiles))
    cfg.pop("waves", None)
    return cfg


def launch_gemv(x, w, s, z, fmt, group, groups_major, y, cfg) -> torch.Tensor:
    """Run the decode kernel ``cfg`` names on ``x (M, K)`` into ``y (M, N)`` (``M <= 16``)."""
    M, K = x.shape
    N = w.shape[0]
    kind = {"pairs": "v1"}.get(cfg.get("kernel", "v1"), cfg.get("kernel", "v1"))
    if kind == "fma" and M > 8:  # the FMA kernel takes up to 8 activation rows a launch
        for m0 in range(0, M, 8):
            launch_gemv(x[m0:m0 + 8], w, s, z, fmt, group, groups_major, y[m0:m0 + 8], cfg)
        return y
    if kind == "v1":
        return _launch_v1(x, [w], [s], [z], fmt, group, groups_major, y, cfg)
    split = cfg["SPLIT_K"]
    sn, sg, zn, zg = _meta_strides(s, z, groups_major)
    g = 0 if group >= K and z is None else group  # one group per row with zero points: still the grouped path
    zz = z if z is not None else s
    from .triton_decode import decode_dot_kernel, decode_kernel

    vec = 16 if fmt == FMT_INT4_K32 else 8
    if w.stride(-1) != 1 or (w.stride(0) * w.element_size()) % vec or w.data_ptr() % 16:
        raise ValueError(f"decode kernels need rows of codes aligned to {vec} bytes, got strides {w.stride()}")
    stride_wv = w.stride(0) * w.element_size() // vec
    stride16 = w.stride(0) * w.element_size() // 16  # the tensor-core kernel reads int32 words, 16-byte rows
    if kind == "dot" and (w.stride(0) * w.element_size()) % 16:
        raise ValueError(f"the tensor-core decode kernel needs 16-byte aligned rows, got strides {w.stride()}")
    if kind == "fma":
        rb = cfg["num_warps"] * 32 // cfg["T"]
        n_blocks = cdiv(N, cfg["R"] * rb)
    else:
        n_blocks = cdiv(N, cfg["BLOCK_N"])
    part = torch.empty((split, M, N), device=x.device, dtype=torch.float32) if split > 1 else y
    tk = tickets(x.device, n_blocks) if split > 1 else y
    kfmt = 4 if fmt == FMT_INT4_K32 else fmt
    if kind == "fma":
        bm = 1 if M == 1 else 2 if M == 2 else 4 if M <= 4 else 8
        decode_kernel[(n_blocks, split)](
            x, w, s, zz, y, part, tk, M, N, K, split, x.stride(0), stride_wv, sn, sg, zn, zg, y.stride(0),
            _MASK16, _XOR15, w, s, zz, sg, zg, N, w, s, zz, sg, zg, 0, x, 0, 0, 0, 1, FMT=kfmt, GROUP=g,
            HAS_Z=z is not None, BLOCK_M=bm, R=cfg["R"], RB=rb, T=cfg["T"], SPLIT=split > 1, ASCENDING=_ascending(),
            NW=1, PF=cfg.get("PF", 0), EXPERTS=False, num_warps=cfg["num_warps"],
            num_stages=cfg.get("num_stages", 1))
    else:
        decode_dot_kernel[(n_blocks, split)](
            x, w, s, zz, y, part, tk, M, N, K, split, x.stride(0), stride16, sn, sg, zn, zg, y.stride(0), FMT=kfmt,
            GROUP=g, HAS_Z=z is not None, BLOCK_N=cfg["BLOCK_N"], TW=cfg["TW"], SPLIT=split > 1, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    return y


def _launch_v1(x, ws, ss, zs, fmt, group, groups_major, y, cfg) -> torch.Tensor:
    """The v1 kernel (:mod:`.triton_gemv`) over one to three weights of one K, their outputs side by side in y."""
    from .triton_gemv import gemv_kernel

    M, K = x.shape
    if fmt == FMT_INT4_K32:
        raise ValueError("the v1 decode kernel reads int4 codes two a byte, not the k32 order")
    if M > (16 if cfg["DOT"] else 1):
        raise ValueError(f"the v1 decode kernel takes {16 if cfg['DOT'] else 1} activation rows with DOT={cfg['DOT']}, "
                         f"got {M}")
    ns = [w.shape[0] for w in ws]
    N = sum(ns)
    split = cfg["SPLIT_K"]
    n_blocks = sum(cdiv(n, cfg["BLOCK_N"]) for n in ns)
    part = torch.empty((split, M, N), device=x.device, dtype=torch.float32) if split > 1 else y
    tk = tickets(x.device, n_blocks) if split > 1 else y
    meta = [_meta_strides(s_, z_, groups_major) for s_, z_ in zip(ss, zs)]
    zz = [z_ if z_ is not None else s_ for s_, z_ in zip(ss, zs)]
    i1, i2 = min(1, len(ws) - 1), min(2, len(ws) - 1)  # weights 1 and 2 (unused slots repeat the last one)
    gemv_kernel[(n_blocks, split)](
        x, ws[0], ss[0], zz[0], y, part, tk, M, N, K, split, x.stride(0), ws[0].stride(0), *meta[0], y.stride(0),
        ws[i1], ss[i1], zz[i1], meta[i1][1], meta[i1][3], ns[0], ws[i2], ss[i2], zz[i2], meta[i2][1], meta[i2][3],
        ns[i1] if len(ws) > 1 else 0, FMT=4 if fmt == FMT_INT4_PAIRS else fmt, GROUP=0 if group >= K else group,
        HAS_Z=zs[0] is not None, BLOCK_M=16 if cfg["DOT"] else 1, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        SPLIT=split > 1, DOT=cfg["DOT"], NW=len(ws), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y


def _one_layout(ws, ss, zs, groups_major) -> bool:
    """The weights share what one multi-weight launch takes once: code dtype and row stride, scale dtype, zero
    points or none, and the row strides of scales and zeros (group strides may differ)."""
    return len({(w.dtype, w.stride(0), w.stride(-1), s_.dtype, z_ is None) + _meta_strides(s_, z_, groups_major)[::2]
                for w, s_, z_ in zip(ws, ss, zs)}) == 1


def launch_gemv_multi(x, ws, ss, zs, fmt, group, groups_major, y, cfg) -> torch.Tensor:
    """Several weights of the same K and format (q/k/v, gate/up) into ``y (M, sum N_i)``, side by side: one
    launch of the kernel ``cfg`` names (the FMA kernel or v1, ``NW`` = 2 or 3) where it applies, else one launch
    per weight (each with its own configuration) into views of y."""
    M, K = x.shape
    ns = [w.shape[0] for w in ws]
    N = sum(ns)
    kind = {"pairs": "v1"}.get(cfg.get("kernel", "v1"), cfg.get("kernel", "v1"))
    fits = {"fma": M <= 8 and fmt != FMT_INT4_PAIRS,
            "v1": M <= (16 if cfg.get("DOT") else 1) and fmt != FMT_INT4_K32}.get(kind, False)
    if not (fits and 2 <= len(ws) <= 3 and _one_layout(ws, ss, zs, groups_major)):
        off = 0
        for w, s_, z_, n in zip(ws, ss, zs, ns):
            launch_gemv(x, w, s_, z_, fmt, group, groups_major, y[:, off:off + n],
                        gemv_config(M, n, K, fmt, group, x.device))
            off += n
        return y
    if kind == "v1":
        return _launch_v1(x, ws, ss, zs, fmt, group, groups_major, y, cfg)
    from .triton_decode import decode_kernel

    vec = 16 if fmt == FMT_INT4_K32 else 8
    for w in ws:
        if w.stride(-1) != 1 or (w.stride(0) * w.element_size()) % vec or w.data_ptr() % 16:
            raise ValueError(f"decode kernels need rows of codes aligned to {vec} bytes, got strides {w.stride()}")
    split = cfg["SPLIT_K"]
    rb = cfg["num_warps"] * 32 // cfg["T"]
    bn = cfg["R"] * rb
    n_blocks = sum(cdiv(n, bn) for n in ns)
    part = torch.empty((split, M, N), device=x.device, dtype=torch.float32) if split > 1 else y
    tk = tickets(x.device, n_blocks) if split > 1 else y
    meta = [_meta_strides(s_, z_, groups_major) for s_, z_ in zip(ss, zs)]
    zz = [z_ if z_ is not None else s_ for s_, z_ in zip(ss, zs)]
    w2, s2, z2, m2 = (ws[2], ss[2], zz[2], meta[2]) if len(ws) == 3 else (ws[1], ss[1], zz[1], meta[1])
    bm = 1 if M == 1 else 2 if M == 2 else 4 if M <= 4 else 8
    decode_kernel[(n_blocks, split)](
        x, ws[0], ss[0], zz[0], y, part, tk, M, N, K, split, x.stride(0), ws[0].stride(0) * ws[0].element_size() // vec,
        meta[0][0], meta[0][1], meta[0][2], meta[0][3], y.stride(0), _MASK16, _XOR15,
        ws[1], ss[1], zz[1], meta[1][1], meta[1][3], ns[0], w2, s2, z2, m2[1], m2[3], ns[1], x, 0, 0, 0, 1,
        FMT=4 if fmt == FMT_INT4_K32 else fmt, GROUP=0 if group >= K and zs[0] is None else group,
        HAS_Z=zs[0] is not None, BLOCK_M=bm, R=cfg["R"], RB=rb, T=cfg["T"], SPLIT=split > 1, ASCENDING=_ascending(), NW=len(ws),
        PF=cfg.get("PF", 0), EXPERTS=False, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1))
    return y


@torch.library.custom_op("openautoglm::wq_gemv_multi", mutates_args=())
def wq_gemv_multi(x: torch.Tensor, ws: list[torch.Tensor], ss: list[torch.Tensor], zs: list[torch.Tensor | None],
                  fmt: int, group: int, groups_major: bool) -> torch.Tensor:
    """``x (M, K)`` times several dequantized weights ``(N_i, K)`` -> ``(M, sum N_i)`` (decode)."""
    x = x.contiguous()
    M, K = x.shape
    N = sum(w.shape[0] for w in ws)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return launch_gemv_multi(x, ws, ss, zs, fmt, group, groups_major, y, gemv_config(M, N, K, fmt, group, x.device))


@wq_gemv_multi.register_fake
def _(x, ws, ss, zs, fmt, group, groups_major):
    return x.new_empty((x.shape[0], sum(w.shape[0] for w in ws)))


@torch.library.custom_op("openautoglm::wq_gemv", mutates_args=())
def wq_gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, fmt: int, group: int,
            groups_major: bool) -> torch.Tensor:
    """``x (M, K) @ dequant(w)^T -> (M, N)`` in x's dtype, M <= 16 (decode)."""
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return launch_gemv(x, w, s, z, fmt, group, groups_major, y, gemv_config(M, N, K, fmt, group, x.device))


@wq_gemv.register_fake
def _(x, w, s, z, fmt, group, groups_major):
    return x.new_empty((x.shape[0], w.shape[0]))
