"""Operations on a quantized KV store: fused decode attention, one-token append, full read.

Every store (:mod:`.stores`, :mod:`.static_store`) describes its buffers as a :class:`StoreView`; the
functions here take that view. ``decode_attention`` and ``append_token`` are ``torch.library`` custom
ops (opaque to dynamo, with fake implementations), so ``torch.compile(fullgraph=True)`` and CUDA-graph
capture take them whole: the Triton kernels of :mod:`.triton_kernels` on CUDA, a float reference here
everywhere else (and for layouts the kernels do not cover: groups under 16 tokens, head_dim not a
power of two).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ..._util import flags
from .. import packing

log = logging.getLogger(__name__)


@dataclass
class StoreView:
    """The buffers of one layer's quantized store and how positions map onto them.

    kq, vq : (batch, kv_heads, rows, head_dim * bits // 8) uint8 codes; ks, km : (batch, kv_heads,
    block_slots, head_dim) float16; vs, vm : (batch, kv_heads, rows, head_dim // vgroup) float16;
    rk, rv : (batch, kv_heads, ring rows, head_dim) full-precision window; length : (1,) int tensor
    (tokens stored, on the device). Quantized block ``j`` lives in slot ``(j - blk_base) % n_block_slots``;
    window position ``p`` in row ``p - nq`` (``ring_from_nq``: an exact-size tail) or ``p % ring_size``.
    """

    kq: torch.Tensor
    ks: torch.Tensor
    km: torch.Tensor
    vq: torch.Tensor
    vs: torch.Tensor
    vm: torch.Tensor
    rk: torch.Tensor
    rv: torch.Tensor
    length: torch.Tensor
    bits: int
    group: int
    vgroup: int
    residual: int
    window: int = 0
    ring_from_nq: bool = False
    ring_size: int = 1 << 30
    n_block_slots: int = 1 << 30
    blk_base: int = 0
    max_blocks: int = 0  # an upper bound on the quantized blocks a query can see (sizes the kernel's splits)

    def layout(self) -> tuple:
        return (self.bits, self.group, self.vgroup, self.residual, self.window, self.ring_from_nq, self.ring_size,
                self.n_block_slots, self.blk_base, self.max_blocks)


def quantized_length(length: int, residual: int, group: int) -> int:
    """Tokens held quantized when ``length`` are stored: whole blocks leave the window at ``residual + group``."""
    return max(0, (length - residual) // group) * group


# ---- float reference ----------------------------------------------------------------------------

def _block_rows(view: StoreView, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block slots of quantized blocks ``blocks`` (n,) and the rows of their tokens (n * group,)."""
    slots = (blocks - view.blk_base) % view.n_block_slots
    return slots, (slots[:, None] * view.group + torch.arange(view.group, device=blocks.device)).flatten()


def gather(view: StoreView, lo: int, hi: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys and values of positions ``lo .. hi - 1`` (all held by the store): (b, h, hi - lo, d)."""
    nq = quantized_length(int(view.length.item()), view.residual, view.group)
    ks, vs = [], []
    g = view.group
    if lo < nq:
        dev = view.kq.device
        blocks = torch.arange(lo // g, nq // g, device=dev)
        slots, rows = _block_rows(view, blocks)
        k = packing.dequantize_keys(view.kq[:, :, rows], view.ks[:, :, slots], view.km[:, :, slots], view.bits, dtype)
        v = packing.dequantize_values(view.vq[:, :, rows], view.vs[:, :, rows], view.vm[:, :, rows], view.bits, dtype)
        off = lo - (lo // g) * g
        ks.append(k[:, :, off:])
        vs.append(v[:, :, off:])
    if hi > max(lo, nq):
        pos = torch.arange(max(lo, nq), hi, device=view.rk.device)
        rows = pos - nq if view.ring_from_nq else pos % view.ring_size
        ks.append(view.rk[:, :, rows].to(dtype))
        vs.append(view.rv[:, :, rows].to(dtype))
    if not ks:
        shape = (*view.rk.shape[:2], 0, view.rk.shape[-1])
        return view.rk.new_zeros(shape, dtype=dtype), view.rv.new_zeros(shape, dtype=dtype)
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def decode_reference(view: StoreView, q: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Float reference of :func:`decode_attention` (fp32 softmax over the dequantized store)."""
    L = int(view.length.item())
    lo = max(0, L - view.window) if view.window else 0
    k, v = gather(view, lo, L, torch.float32)
    b, hq, _, d = q.shape
    grp = hq // k.shape[1]
    k, v = k.repeat_interleave(grp, dim=1), v.repeat_interleave(grp, dim=1)
    s = (q.float() @ k.transpose(-1, -2)) * scale  # (b, hq, 1, n)
    if mask is not None:
        m = mask[:, lo:L].bool()
        s = s.masked_fill(~m[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ v).transpose(1, 2).to(q.dtype)  # (b, 1, hq, d)


def append_reference(view: StoreView, k: torch.Tensor, v: torch.Tensor) -> None:
    """Float reference of :func:`append_token` (one token per sequence; may quantize the window's oldest block)."""
    L0 = int(view.length.item())
    slot = L0 % view.ring_size
    view.rk[:, :, slot] = k[:, :, 0].to(view.rk.dtype)
    view.rv[:, :, slot] = v[:, :, 0].to(view.rv.dtype)
    L = L0 + 1
    g, r = view.group, view.residual
    if L >= r + g and (L - r) % g == 0:
        blk = (L - r - g) // g
        rows = torch.arange(blk * g, blk * g + g, device=k.device) % view.ring_size
        qk = packing.quantize_keys(view.rk[:, :, rows], view.bits, g)
        qv = packing.quantize_values(view.rv[:, :, rows], view.bits, view.vgroup)
        slots, qrows = _block_rows(view, torch.tensor([blk], device=k.device))
        view.kq[:, :, qrows], view.ks[:, :, slots], view.km[:, :, slots] = qk[0], qk[1], qk[2]
        view.vq[:, :, qrows], view.vs[:, :, qrows], view.vm[:, :, qrows] = qv


# ---- Triton dispatch ----------------------------------------------------------------------------

def triton_available() -> bool:
    """The Triton KV kernels run here: ``OPENAUTOGLM_KV_TRITON`` is on (read at each call) and Triton imports."""
    return flags.enabled(flags.KV_TRITON) and _triton_imports()


@functools.lru_cache(maxsize=None)
def _triton_imports() -> bool:
    try:
        from . import triton_kernels  # noqa: F401

        return True
    except Exception as e:  # noqa: BLE001 - no triton, or a broken install: use the float reference
        log.info("Triton KV kernels unavailable (%s); using the torch reference", e)
        return False


def channel_part(bits: int, head_dim: int, vgroup: int) -> int:
    """Channels the decode kernel takes per part: within one packing slice and one value group."""
    return min(head_dim * bits // 8, vgroup)


def kernel_supports(view: StoreView, head_dim: int) -> bool:
    """Layouts the Triton kernels take: powers of two, tiles of at least 16 for tl.dot, at most 4 channel parts."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    cp = channel_part(view.bits, head_dim, view.vgroup)
    return (view.group >= 16 and cp >= 16 and head_dim // cp <= 4 and pow2(head_dim) and pow2(view.group)
            and pow2(view.vgroup))


def _use_triton(view: StoreView, t: torch.Tensor) -> bool:
    return (t.is_cuda or flags.triton_interpret()) and triton_available() and kernel_supports(view, t.shape[-1])


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# Launch configuration of the decode kernels: ``per_sm`` programs per multiprocessor that the context splits aim
# for, at most ``max_split`` splits, at least ``min_blocks`` quantized blocks per split; ``share_bytes``: load a
# tile's packed bytes once for every channel part (INT4/INT2); ``magic``: codes become 16-bit floats by their
# bits instead of a conversion. ``vec``: GQA group 1 takes :func:`.triton_vec.decode_vec_kernel` (no tl.dot),
# launched with the ``vec_*`` keys: ``vec_words`` (0, 2 or 4) reads the codes as int32 words, that many a thread
# (0: bytes), ``vec_lazy`` > 0 rescales its accumulators only when the running maximum grows by more than that
# many natural-log units; ``reduce_block_d``: channels per program of the reduce. Chosen from
# benchmarks/results/kv/kernel_sweep.json (H100, 7B layer, INT4/INT8 at 8k/32k, batch 1/8): the vec kernel
# with 64-token tiles, words 2 a thread, lazy rescaling at 8 and 8 programs per SM (167 registers: 3 programs
# resident per multiprocessor instead of 2; about 710 instead of 1020 instructions per tile,
# results/kv/kernel_regs.json) takes 0.84x / 0.75x / 0.74x the time of the first tuned vec launch at INT4
# 8k x 1 / 32k x 1 / 32k x 8; 4 programs per SM is faster still at batch 8 (0.92x at 32k x 8) and slower at
# batch 1. For the tl.dot kernel (groups > 1) 16 programs per SM and shared bytes, ``magic`` no faster.
# Where the time goes: see the README's KV section.
DECODE_CONFIG = dict(per_sm=16, max_split=256, min_blocks=1, num_warps=4, num_stages=3, share_bytes=True, magic=False,
                     vec=True, vec_block_n=64, vec_per_sm=8, vec_num_warps=4, vec_num_stages=3, vec_lazy=8.0,
                     vec_words=2, reduce_block_d=32)


def magic_bits(dtype: torch.dtype, bits: int, enabled: bool = True) -> int:
    """The float bits the decode kernel ORs codes into (0: convert them): bf16 128.0 for codes under 128,
    fp16 1024.0 for any code width here; float32 inputs are converted (the GPU's float32 dot rounds to tf32)."""
    if not enabled:
        return 0
    if dtype == torch.bfloat16 and bits <= 4:
        return 0x4300
    if dtype == torch.float16:
        return 0x6400
    return 0


def n_splits(batch_heads: int, max_blocks: int, device: torch.device, cfg: dict | None = None) -> int:
    """Splits of the context so that about ``per_sm`` programs per multiprocessor run (at least ``min_blocks``
    blocks each)."""
    cfg = cfg or DECODE_CONFIG
    most = max(1, max_blocks // max(cfg["min_blocks"], 1))
    want = -(-cfg["per_sm"] * _multiprocessors(device) // max(batch_heads, 1))
    return max(1, min(most, want, cfg["max_split"]))


def decode_triton(view: StoreView, q: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  cfg: dict | None = None) -> torch.Tensor:
    """Fused decode attention; ``cfg`` overrides :data:`DECODE_CONFIG` (keys of the same names)."""
    from . import triton_kernels as tk

    cfg = {**DECODE_CONFIG, **(cfg or {})}
    b, hq, _, d = q.shape
    hkv = view.rk.shape[1]
    grp = hq // hkv
    vec = bool(cfg["vec"]) and grp == 1
    if vec:
        cfg = {**cfg, "per_sm": cfg["vec_per_sm"]}
        if int(cfg["vec_words"]) not in (0, 2, 4):
            raise ValueError(f"vec_words={cfg['vec_words']!r}: use 0 (bytes), 2 or 4 (int32 words a thread)")
    nsplit = n_splits(b * hkv, max(view.max_blocks, 1), q.device, cfg)
    per_split = -(-max(view.max_blocks, 1) // nsplit)
    part = torch.empty(b, hq, nsplit + 1, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hq, nsplit + 1, device=q.device, dtype=torch.float32)
    m = mask if mask is not None else view.length
    args = (q, view.kq, view.ks, view.km, view.vq, view.vs, view.vm, view.rk, view.rv, view.length, m, part, lse,
            scale, per_split, view.ring_size, view.n_block_slots, view.blk_base,
            q.stride(0), q.stride(1), view.kq.stride(0), view.kq.stride(1), view.ks.stride(0), view.ks.stride(1),
            view.vq.stride(0), view.vq.stride(1), view.vs.stride(0), view.vs.stride(1), view.rk.stride(0),
            view.rk.stride(1), m.stride(0) if mask is not None else 0, m.shape[-1] if mask is not None else 0,
            part.stride(0), part.stride(1), lse.stride(0), lse.stride(1), nsplit)
    common = dict(HKV=hkv, D=d, BITS=view.bits, G=view.group, GV=view.vgroup, R=view.residual, WINDOW=view.window,
                  RING_FROM_NQ=view.ring_from_nq, HAS_MASK=mask is not None,
                  CP=channel_part(view.bits, d, view.vgroup))
    if vec:
        from . import triton_vec

        triton_vec.decode_vec_kernel[(b * hkv, nsplit + 1)](
            *args, (127 + view.bits) << 23, BLOCK_N=min(view.group, int(cfg["vec_block_n"])), **common,
            LAZY=float(cfg["vec_lazy"]), WORDS=int(cfg["vec_words"]),
            num_warps=cfg["vec_num_warps"], num_stages=cfg["vec_num_stages"])
    else:
        tk.decode_kernel[(b * hkv, nsplit + 1)](
            *args, GRP=grp, BLOCK_H=max(16, triton_next_pow2(grp)), BLOCK_N=min(view.group, 64), **common,
            SHARE_BYTES=bool(cfg["share_bytes"]), MAGIC=magic_bits(q.dtype, view.bits, cfg["magic"]),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out = torch.empty(b, 1, hq, d, device=q.device, dtype=q.dtype)
    bd = min(d, int(cfg["reduce_block_d"]))
    tk.reduce_kernel[(b * hq, d // bd)](part, lse, out, part.stride(0), part.stride(1), lse.stride(0), lse.stride(1),
                                        out.stride(0), out.stride(2), hq, nsplit + 1, D=d,
                                        BLOCK_P=triton_next_pow2(nsplit + 1), BLOCK_D=bd)
    return out


def append_triton(view: StoreView, k: torch.Tensor, v: torch.Tensor) -> None:
    from . import triton_kernels as tk

    b, hkv, _, d = k.shape
    tk.append_kernel[(b * hkv,)](
        k, v, view.kq, view.ks, view.km, view.vq, view.vs, view.vm, view.rk, view.rv, view.length,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), view.kq.stride(0), view.kq.stride(1),
        view.ks.stride(0), view.ks.stride(1), view.vq.stride(0), view.vq.stride(1), view.vs.stride(0),
        view.vs.stride(1), view.rk.stride(0), view.rk.stride(1), view.ring_size, view.n_block_slots,
        HKV=hkv, D=d, BITS=view.bits, G=view.group, GV=view.vgroup, R=view.residual, num_warps=4,
    )


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---- custom ops ---------------------------------------------------------------------------------

def _view(tensors, layout) -> StoreView:
    return StoreView(*tensors, *layout)


@torch.library.custom_op("openautoglm::kv_decode", mutates_args=())
def _kv_decode(q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, km: torch.Tensor, vq: torch.Tensor,
               vs: torch.Tensor, vm: torch.Tensor, rk: torch.Tensor, rv: torch.Tensor, length: torch.Tensor,
               mask: torch.Tensor | None, scale: float, layout: list[int]) -> torch.Tensor:
    view = _view((kq, ks, km, vq, vs, vm, rk, rv, length), _unlayout(layout))
    if _use_triton(view, q):
        return decode_triton(view, q, mask, scale)
    return decode_reference(view, q, mask, scale)


@_kv_decode.register_fake
def _(q, kq, ks, km, vq, vs, vm, rk, rv, length, mask, scale, layout):
    b, hq, _, d = q.shape
    return q.new_empty(b, 1, hq, d)


@torch.library.custom_op("openautoglm::kv_append", mutates_args=("kq", "ks", "km", "vq", "vs", "vm", "rk", "rv"))
def _kv_append(k: torch.Tensor, v: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, km: torch.Tensor,
               vq: torch.Tensor, vs: torch.Tensor, vm: torch.Tensor, rk: torch.Tensor, rv: torch.Tensor,
               length: torch.Tensor, layout: list[int]) -> None:
    view = _view((kq, ks, km, vq, vs, vm, rk, rv, length), _unlayout(layout))
    if _use_triton(view, k):
        append_triton(view, k, v)
    else:
        append_reference(view, k, v)


@_kv_append.register_fake
def _(k, v, kq, ks, km, vq, vs, vm, rk, rv, length, layout):
    return None


def _unlayout(layout) -> tuple:
    bits, group, vgroup, residual, window, ring_from_nq, ring_size, n_block_slots, blk_base, max_blocks = layout
    return bits, group, vgroup, residual, window, bool(ring_from_nq), ring_size, n_block_slots, blk_base, max_blocks


def _tensors(view: StoreView) -> tuple:
    return view.kq, view.ks, view.km, view.vq, view.vs, view.vm, view.rk, view.rv, view.length


def decode_attention(view: StoreView, q: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of one query token per sequence over everything the store holds.

    q : (batch, heads, 1, head_dim); mask : None or (batch, >= length) bool, True = attend (absolute
    positions); returns (batch, 1, heads, head_dim) in q's dtype (the layout transformers' attention
    functions return).
    """
    return _kv_decode(q, *_tensors(view), mask, float(scale), [int(x) for x in view.layout()])


def append_token(view: StoreView, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store one new token per sequence (k, v: (batch, kv_heads, 1, head_dim)) in a ring-window store.

    The caller advances ``length`` (``length.add_(1)``) afterwards.
    """
    if view.ring_from_nq:
        raise ValueError("append_token needs a ring window (a static store); exact-size stores append on the host")
    _kv_append(k, v, *_tensors(view), [int(x) for x in view.layout()])
