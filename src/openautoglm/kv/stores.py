"""Per-layer KV stores: full precision, and KIVI-quantized with a full-precision recent window.

A store holds one layer's keys and values, each ``(batch, kv_heads, seq, head_dim)`` when read.
``read_with(k_new, v_new)`` returns what attention over "everything stored, then the new tokens" needs
(positions from 0; a store may pad or zero-fill, see ``mask_sizes``); ``append(k, v)`` stores tokens;
``decode(q, mask, scale)`` (quantized stores) attends one query token straight from the store.

:class:`QuantStore` grows with the sequence and holds tensors of exactly the size they need (no
capacity slack, the window only as long as it is), so ``nbytes`` is what it really holds; the
preallocated, CUDA-graph-safe variant is :class:`~openautoglm.kv.static_store.StaticQuantStore`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import packing
from .kernels import ops
from .layout import resolve_residual


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view keeps its whole storage alive)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def value_group(group: int, head_dim: int, bits: int) -> int:
    """Channels per value group (``min(group, head_dim)``), validated against ``head_dim``."""
    vg = min(group, head_dim)
    if head_dim % vg or vg % (8 // bits):
        raise ValueError(f"head_dim={head_dim} cannot be cut into value groups of {vg} channels; "
                         f"use a group_size that divides head_dim (e.g. {head_dim})")
    return vg


def first_needed_block(length: int, window: int, group: int) -> int:
    """Oldest quantized block the query at position ``length - 1`` (and every later one) sees through a
    sliding window of ``window`` tokens (keys ``length - window .. length - 1``); 0 without a window."""
    return max(0, length - window) // group if window else 0


class _StoreBase:
    window = 0

    def __init__(self) -> None:
        self.batch: int | None = None
        self.heads: int | None = None
        self.head_dim: int | None = None

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dim() != 4 or v.shape[:3] != k.shape[:3]:
            raise ValueError(
                f"keys {tuple(k.shape)} / values {tuple(v.shape)} must be (batch, kv_heads, seq, head_dim)"
            )
        b, h, _, d = k.shape
        if self.batch is None:
            self.batch, self.heads, self.head_dim = b, h, d
            self._init(k, v)
        elif b != self.batch:
            raise ValueError(
                f"this KV cache holds batch size {self.batch} but got batch size {b}; a cache serves one batch: "
                "call cache.reset() or create a new cache for a different batch"
            )
        elif (h, d) != (self.heads, self.head_dim):
            raise ValueError(f"this KV cache holds {self.heads} heads x {self.head_dim} dims, got {h} x {d}")

    def _init(self, k, v) -> None:  # pragma: no cover - overridden
        pass

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens and return what attention over the store needs.

        A chunk of several tokens (prefill) attends to the stored past and to itself exactly; a single
        decode token is stored first (a full window flushes its oldest block now), so this path and the
        fused decode attention see the same state.
        """
        self._check(k, v)
        if k.shape[-2] == 1:
            self.append(k, v)
            return self.read_with(k[:, :, :0], v[:, :, :0])
        out = self.read_with(k, v)
        self.append(k, v)
        return out

    def reset(self) -> None:
        self.__init__(**self._init_kwargs())

    def _init_kwargs(self) -> dict:
        return {}

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of what ``read_with`` returns for ``query_length`` new tokens."""
        return self.length + query_length, 0

    def nbytes(self) -> int:
        return storage_bytes(self.tensors())


class FullStore(_StoreBase):
    """Keys and values kept as they come (the DynamicCache layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def _init(self, k, v) -> None:
        self.k, self.v = k.new_empty(*k.shape[:2], 0, k.shape[3]), v.new_empty(*v.shape[:2], 0, v.shape[3])

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def read(self):
        return self.k, self.v

    def read_with(self, k_new, v_new):
        return torch.cat([self.k, k_new], dim=-2), torch.cat([self.v, v_new], dim=-2)

    def append(self, k, v) -> None:
        self._check(k, v)
        self.k, self.v = torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)

    def update(self, k, v):
        self.append(k, v)
        return self.k, self.v

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.k, self.v) if t is not None)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.k is not None:
            self.k, self.v = fn(self.k), fn(self.v)
            self.batch = self.k.shape[0]


class QuantStore(_StoreBase):
    """KIVI store: quantized blocks of ``group`` tokens plus the most recent tokens in full precision.

    The full-precision window holds between ``residual`` and ``residual + group - 1`` tokens once the
    sequence is that long. Whenever it reaches ``residual + group`` tokens, its oldest whole blocks are
    quantized (once: a block is never re-quantized) and appended to the packed store. Prefill goes
    through the same rule, so a long prompt leaves the same state as the same tokens decoded one by one.
    ``window`` (sliding-window layers): blocks no query can see any more are dropped.
    """

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int | str = 128, window: int = 0) -> None:
        super().__init__()
        # "auto": sized from the first chunk appended (the prompt), see openautoglm.kv.layout.resolve_residual
        self.bits, self.group, self.residual, self.window = bits, group_size, residual_length, window
        self.vgroup: int | None = None
        self.first_block = 0  # oldest quantized block still held (sliding window)
        self.res_k = self.res_v = None
        self.kq = self.ks = self.km = None  # (b, h, n_tok, d*bits/8) uint8, (b, h, n_blocks, d) fp16 x2
        self.vq = self.vs = self.vm = None  # (b, h, n_tok, d*bits/8) uint8, (b, h, n_tok, d/vgroup) fp16 x2
        self._len = 0
        self.length_t: torch.Tensor | None = None

    def _init_kwargs(self) -> dict:
        return dict(bits=self.bits, group_size=self.group, residual_length=self.residual, window=self.window)

    def _init(self, k, v) -> None:
        b, h, n, d = k.shape
        if self.residual == "auto":  # the first chunk (the prompt) is the context this store knows
            self.residual = resolve_residual("auto", self.group, n, self.bits)
        self.vgroup = value_group(self.group, d, self.bits)
        dev, dp = k.device, d * self.bits // 8
        self.res_k, self.res_v = k.new_empty(b, h, 0, d), v.new_empty(b, h, 0, d)
        self.kq = torch.empty(b, h, 0, dp, dtype=torch.uint8, device=dev)
        self.ks = torch.empty(b, h, 0, d, dtype=packing.SCALE_DTYPE, device=dev)
        self.km = torch.empty_like(self.ks)
        self.vq = torch.empty(b, h, 0, dp, dtype=torch.uint8, device=dev)
        self.vs = torch.empty(b, h, 0, d // self.vgroup, dtype=packing.SCALE_DTYPE, device=dev)
        self.vm = torch.empty_like(self.vs)
        self.length_t = torch.zeros((), dtype=torch.int64, device=dev)

    @property
    def length(self) -> int:
        return self._len

    @property
    def quantized_length(self) -> int:
        if self.residual == "auto":  # nothing stored yet
            return 0
        return ops.quantized_length(self._len, self.residual, self.group)

    def view(self) -> ops.StoreView:
        nq = self.quantized_length
        return ops.StoreView(self.kq, self.ks, self.km, self.vq, self.vs, self.vm, self.res_k, self.res_v,
                             self.length_t, self.bits, self.group, self.vgroup, self.residual, self.window,
                             ring_from_nq=True, blk_base=self.first_block,
                             max_blocks=max(1, nq // self.group - self.first_block))

    def read_with(self, k_new, v_new):
        """Positions 0 .. length - 1 (zeros where a sliding window dropped them), then the new tokens."""
        if self.res_k is None:
            return k_new, v_new
        lo = self.first_block * self.group
        k, v = ops.gather(self.view(), lo, self._len, k_new.dtype)
        if lo:
            pad = k.new_zeros(*k.shape[:2], lo, k.shape[-1])
            k, v = torch.cat([pad, k], dim=2), torch.cat([pad, v], dim=2)
        return torch.cat([k, k_new], dim=-2), torch.cat([v, v_new.to(v.dtype)], dim=-2)

    def read(self):
        return self.read_with(self.res_k[:, :, :0], self.res_v[:, :, :0])

    def decode(self, q: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        return ops.decode_attention(self.view(), q, mask, scale)

    def append(self, k, v) -> None:
        self._check(k, v)
        g = self.group
        nq0, length = self.quantized_length, self._len + k.shape[-2]
        nq1 = ops.quantized_length(length, self.residual, g)
        tail_k, tail_v = torch.cat([self.res_k, k], dim=-2), torch.cat([self.res_v, v], dim=-2)
        need = first_needed_block(length, self.window, g)  # older blocks: outside every future window
        j0 = max(nq0 // g, min(need, nq1 // g))  # first block to quantize (a long chunk skips blocks nobody reads)
        drop = min(max(0, need - self.first_block), self.ks.shape[2])
        if nq1 > j0 * g or drop:
            qk = packing.quantize_keys(tail_k[:, :, j0 * g - nq0 : nq1 - nq0], self.bits, g)
            qv = packing.quantize_values(tail_v[:, :, j0 * g - nq0 : nq1 - nq0], self.bits, self.vgroup)
            self.kq, self.vq, self.vs, self.vm = (torch.cat([a[:, :, drop * g :], b], dim=2)
                                                  for a, b in zip((self.kq, self.vq, self.vs, self.vm), (qk[0], *qv)))
            self.ks, self.km = (torch.cat([a[:, :, drop:], b], dim=2) for a, b in zip((self.ks, self.km), qk[1:]))
            self.first_block = nq1 // g - self.ks.shape[2]
        # clone: a slice would keep the whole prefill-sized tail storage alive
        self.res_k, self.res_v = tail_k[:, :, nq1 - nq0 :].clone(), tail_v[:, :, nq1 - nq0 :].clone()
        self._len = length
        self.length_t.fill_(length)

    def tensors(self) -> Iterator[torch.Tensor]:
        for t in (self.res_k, self.res_v, self.kq, self.ks, self.km, self.vq, self.vs, self.vm):
            if t is not None:
                yield t

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.res_k is None:
            return
        for name in ("res_k", "res_v", "kq", "ks", "km", "vq", "vs", "vm"):
            setattr(self, name, fn(getattr(self, name)))
        self.batch = self.res_k.shape[0]
