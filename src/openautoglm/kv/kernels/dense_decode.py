"""Decode attention over a full-precision static KV cache: one Triton launch that reads only the valid keys.

:class:`openautoglm.generation.generator.Generator` keeps per-layer K/V buffers of a fixed length ``L`` and decodes one token
per sequence at position ``pos`` (a device tensor: the step is replayed from a CUDA graph). SDPA with the
boolean mask ``arange(L) <= pos`` reads all ``L`` keys every step; :func:`decode_attention` reads ``0 .. pos``
only (flash-decoding, :mod:`.triton_dense`), with the split count a static function of the shapes so the
captured graph stays valid while ``pos`` grows.

``openautoglm::decode_attention_dense`` is a ``torch.library`` custom op (opaque to dynamo, with a fake
implementation), so ``torch.compile(fullgraph=True)`` and CUDA-graph capture take it whole. On the CPU, and
for layouts the kernel does not cover (head_dim not a power of two in 32..256, other dtypes, non-contiguous
caches), the op runs the masked SDPA it replaces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._util import flags
from ..._util.scratch import tickets
from . import ops

# Launch configuration. ``per_sm``: (splits x sequences x KV heads) programs per multiprocessor the split count
# aims for at long caches; at most ``max_split`` splits (the combine is unrolled over them); tiles of
# ``block_n`` keys (``block_n_256`` at head_dim 256), chunks a multiple of the tile; ``num_stages`` tiles in
# flight per program (bf16, head_dim 128, 64-key tiles: 32 KiB of K and V per stage).
DENSE_CONFIG = dict(per_sm=2, max_split=32, block_n=64, block_n_256=32, num_warps=4, num_stages=2)

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return flags.triton_interpret()  # Triton's CPU interpreter: the kernel runs on CPU tensors


def split_plan(length: int, batch_kv_heads: int, head_dim: int, device: torch.device,
               cfg: dict | None = None) -> tuple[int, int, int]:
    """``(block_n, chunk, n_split)`` for a cache of ``length`` rows and ``batch_kv_heads`` (sequence, KV head)
    pairs: about ``per_sm`` programs per multiprocessor once every split has keys, chunks of whole tiles.
    A function of the shapes only (never of ``pos``), so a captured CUDA graph fits every step."""
    cfg = {**DENSE_CONFIG, **(cfg or {})}
    bn = int(cfg["block_n"] if head_dim <= 128 else cfg["block_n_256"])
    want = max(1, min(int(cfg["max_split"]), -(-int(cfg["per_sm"]) * ops._multiprocessors(device) // batch_kv_heads)))
    chunk = max(bn, -(-length // (want * bn)) * bn)  # ceil(length / want) rounded up to whole tiles
    n_split = -(-length // chunk)
    return bn, chunk, n_split


def kernel_supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether :func:`decode_triton` takes these tensors: CUDA (or the Triton interpreter), bf16/fp16 (float32 too
    in the interpreter: the GPU's float32 dot would round to tf32), one query token, head_dim a power of two in
    32..256, caches of the same shape, contiguous, on q's device and dtype, query heads a multiple of KV heads."""
    if q.dim() != 4 or k_cache.dim() != 4 or q.shape[2] != 1 or k_cache.shape != v_cache.shape:
        return False
    d = q.shape[-1]
    b, hkv, _, dk = k_cache.shape
    dtypes = (torch.bfloat16, torch.float16) + ((torch.float32,) if _interpreting() else ())
    return ((q.is_cuda or _interpreting()) and q.dtype in dtypes and k_cache.dtype == v_cache.dtype == q.dtype
            and q.device == k_cache.device == v_cache.device and d == dk and 32 <= d <= 256 and d & (d - 1) == 0
            and q.shape[0] == b and q.shape[1] % hkv == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.stride(-1) == 1 and ops.triton_available())


def decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, scale: float,
                  cfg: dict | None = None) -> torch.Tensor:
    """Attention of ``q (B, H, 1, D)`` over keys ``0 .. pos`` of ``k_cache / v_cache (B, Hkv, L, D)``
    (``pos``: (1,) integer tensor on the device) -> ``(B, H, 1, D)`` in q's dtype. ``cfg`` overrides
    :data:`DENSE_CONFIG` (keys of the same names). One launch; the workspace is allocated here (inside a
    CUDA graph it comes from the graph's pool), the tickets are shared with the split-K GEMVs."""
    from .triton_dense import dense_decode_kernel

    cfg = {**DENSE_CONFIG, **(cfg or {})}
    B, H, _, D = q.shape
    hkv, L = k_cache.shape[1], k_cache.shape[2]
    grp = H // hkv
    bh = B * hkv
    block_h = max(16, ops.triton_next_pow2(grp))
    bn, chunk, n_split = split_plan(L, bh, D, q.device, cfg)
    po = torch.empty(bh, n_split, block_h, D, device=q.device, dtype=torch.float32)
    pml = torch.empty(2, bh, n_split, block_h, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    tk = tickets(q.device, bh)
    dense_decode_kernel[(n_split, bh)](
        q, k_cache, v_cache, pos, po, pml[0], pml[1], out, tk, float(scale) * LOG2E, L, chunk, n_split,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        out.stride(1), HKV=hkv, GRP=grp, BLOCK_H=block_h, D=D, BLOCK_N=bn, BLOCK_S=ops.triton_next_pow2(n_split),
        UPCAST=_interpreting() and q.dtype == torch.bfloat16, num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]))
    return out


def decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The masked SDPA call the kernel replaces (keys ``0 .. pos``)."""
    L = k_cache.shape[2]
    mask = (torch.arange(L, device=k_cache.device) <= pos.view(-1, 1)).view(1, 1, 1, L)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k_cache.shape[1])


@torch.library.custom_op("openautoglm::decode_attention_dense", mutates_args=())
def _decode_dense(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                  scale: float) -> torch.Tensor:
    if kernel_supports(q, k_cache, v_cache):
        return decode_triton(q, k_cache, v_cache, pos, scale)
    return decode_reference(q, k_cache, v_cache, pos, scale)


@_decode_dense.register_fake
def _(q, k_cache, v_cache, pos, scale):
    return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over the first ``pos + 1`` rows of a static cache.

    Parameters
    ----------
    q : (batch, heads, 1, head_dim) query (bf16 / fp16 for the kernel).
    k_cache, v_cache : (batch, kv_heads, L, head_dim) contiguous cache buffers; ``heads`` a multiple of
        ``kv_heads`` (GQA).
    pos : (1,) integer tensor (on the device): the position of the query; keys ``0 .. pos`` are attended,
        the same for every sequence.
    scale : softmax scale (default ``head_dim ** -0.5``).

    Returns
    -------
    (batch, heads, 1, head_dim) in q's dtype.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention takes one query token per sequence, q (batch, heads, 1, head_dim); "
                         f"got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != q.shape[0] \
            or k_cache.shape[-1] != q.shape[-1] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"k_cache / v_cache must be (batch, kv_heads, L, head_dim) matching q {tuple(q.shape)} "
                         f"with heads a multiple of kv_heads; got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if pos.numel() != 1 or pos.dtype.is_floating_point:
        raise ValueError(f"pos must be a one-element integer tensor, got {pos.dtype} of shape {tuple(pos.shape)}")
    s = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _decode_dense(q, k_cache, v_cache, pos.reshape(1), s)
