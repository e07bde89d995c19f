"""``StaticQuantStore``: a preallocated KIVI store for compiled and CUDA-graph decode.

Everything is allocated once, at the first update, for ``capacity`` tokens: the quantized blocks
(``ceil(capacity / group)`` block slots, or a ring of ``ceil(window / group) + 1`` slots for a
sliding-window layer), their float16 scales and minima, and a full-precision window ring of
``residual + group`` slots. The length is a device tensor. A decode step (one new token per sequence)
is one kernel that writes the token into the ring and, when the window is full, quantizes its oldest
block in place (``ops.append_token``), then ``length += 1``: no allocation, no ``torch.cat``, no host
sync, the same addresses every step, so ``torch.compile(fullgraph=True)`` and CUDA graphs capture it.
Prefill (several tokens at once) runs on the host side with the same rule, so both paths leave the
same state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import packing
from .kernels import ops
from .stores import _StoreBase, first_needed_block, value_group


def _mark_static(tensors) -> None:
    """Tell dynamo the buffers keep their addresses (CUDA graphs then read them in place)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


def _capturing(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


class StaticQuantStore(_StoreBase):
    """Preallocated quantized store of ``capacity`` tokens (see the module docstring).

    Parameters
    ----------
    bits, group_size, residual_length : as :class:`~openautoglm.kv.stores.QuantStore`
    capacity : most tokens the store will ever hold (prompt + new tokens)
    window : sliding-window size of the layer (0: full attention)
    """

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128, capacity: int = 4096,
                 window: int = 0) -> None:
        super().__init__()
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} must be a positive integer (tokens)")
        self.bits, self.group, self.residual, self.capacity, self.window = bits, group_size, residual_length, capacity, window
        self.vgroup: int | None = None
        n_blocks = -(-capacity // group_size)
        self.n_block_slots = min(n_blocks, -(-window // group_size) + 1) if window else n_blocks
        self.ring_size = residual_length + group_size
        self.kq = self.ks = self.km = self.vq = self.vs = self.vm = self.rk = self.rv = None
        self.length_t: torch.Tensor | None = None
        self._host_len: int | None = 0  # known on the host in eager use; None once a captured step ran

    def _init_kwargs(self) -> dict:
        return dict(bits=self.bits, group_size=self.group, residual_length=self.residual, capacity=self.capacity,
                    window=self.window)

    def _init(self, k, v) -> None:
        b, h, _, d = k.shape
        self.vgroup = value_group(self.group, d, self.bits)
        dev, dp, rows = k.device, d * self.bits // 8, self.n_block_slots * self.group
        self.kq = torch.zeros(b, h, rows, dp, dtype=torch.uint8, device=dev)
        self.vq = torch.zeros(b, h, rows, dp, dtype=torch.uint8, device=dev)
        self.ks = torch.zeros(b, h, self.n_block_slots, d, dtype=packing.SCALE_DTYPE, device=dev)
        self.km = torch.zeros_like(self.ks)
        self.vs = torch.zeros(b, h, rows, d // self.vgroup, dtype=packing.SCALE_DTYPE, device=dev)
        self.vm = torch.zeros_like(self.vs)
        self.rk = torch.zeros(b, h, self.ring_size, d, dtype=k.dtype, device=dev)
        self.rv = torch.zeros(b, h, self.ring_size, d, dtype=v.dtype, device=dev)
        self.length_t = torch.zeros((), dtype=torch.int64, device=dev)
        _mark_static(self.tensors())

    @property
    def length(self) -> int:
        """Tokens stored (a host sync when a captured step has run since the last eager update)."""
        if self.length_t is None:
            return 0
        if self._host_len is None:
            self._host_len = int(self.length_t.item())
        return self._host_len

    def length_tensor(self):
        """The device length (what transformers' static layers return from ``get_seq_length``)."""
        return self.length_t if self.length_t is not None else 0

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0  # static: the mask always spans the capacity (positions from 0)

    def view(self) -> ops.StoreView:
        return ops.StoreView(self.kq, self.ks, self.km, self.vq, self.vs, self.vm, self.rk, self.rv, self.length_t,
                             self.bits, self.group, self.vgroup, self.residual, self.window, ring_from_nq=False,
                             ring_size=self.ring_size, n_block_slots=self.n_block_slots, blk_base=0,
                             max_blocks=self.n_block_slots)

    def read_with(self, k_new, v_new):
        """Positions 0 .. capacity - 1: the dequantized store, then the new tokens, zeros after (as StaticCache)."""
        t = k_new.shape[-2]
        if self.kq is None:
            self._check(k_new, v_new)
        L0 = self.length
        if L0 + t > self.capacity:
            raise ValueError(f"the KV cache holds at most {self.capacity} tokens (max_cache_len); "
                             f"{L0} stored + {t} new do not fit")
        lo = first_needed_block(L0, self.window, self.group) * self.group if self.window else 0
        lo = max(lo, (ops.quantized_length(L0, self.residual, self.group) // self.group - self.n_block_slots)
                 * self.group, 0)
        k, v = ops.gather(self.view(), lo, L0, k_new.dtype)
        out_k = k_new.new_zeros(*k_new.shape[:2], self.capacity, k_new.shape[-1])
        out_v = torch.zeros_like(out_k)
        out_k[:, :, lo:L0], out_v[:, :, lo:L0] = k, v
        out_k[:, :, L0 : L0 + t], out_v[:, :, L0 : L0 + t] = k_new, v_new
        return out_k, out_v

    def read(self):
        k, v = self.read_with(self.rk[:, :, :0], self.rv[:, :, :0])
        return k[:, :, : self.length], v[:, :, : self.length]

    def decode(self, q: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        return ops.decode_attention(self.view(), q, mask, scale)

    def append(self, k, v) -> None:
        self._check(k, v)
        t = k.shape[-2]
        if t == 1 and (self._host_len is None or _capturing(k) or self._host_len + 1 <= self.capacity):
            ops.append_token(self.view(), k, v)
            self.length_t.add_(1)
            if _capturing(k) or self._host_len is None:
                self._host_len = None
            else:
                self._host_len += 1
            return
        self._append_chunk(k, v)

    def _append_chunk(self, k, v) -> None:
        g, t = self.group, k.shape[-2]
        L0 = self.length
        length = L0 + t
        if length > self.capacity:
            raise ValueError(f"the KV cache holds at most {self.capacity} tokens (max_cache_len); "
                             f"{L0} stored + {t} new do not fit")
        nq0, nq1 = (ops.quantized_length(n, self.residual, g) for n in (L0, length))
        ring_rows = torch.arange(nq0, L0, device=k.device) % self.ring_size
        tail_k = torch.cat([self.rk[:, :, ring_rows], k.to(self.rk.dtype)], dim=2)
        tail_v = torch.cat([self.rv[:, :, ring_rows], v.to(self.rv.dtype)], dim=2)
        # blocks older than every future query's window, or than the block ring, are not written
        need = max(first_needed_block(length, self.window, g), nq1 // g - self.n_block_slots)
        j0 = max(nq0 // g, min(need, nq1 // g))
        if nq1 > j0 * g:
            qk = packing.quantize_keys(tail_k[:, :, j0 * g - nq0 : nq1 - nq0], self.bits, g)
            qv = packing.quantize_values(tail_v[:, :, j0 * g - nq0 : nq1 - nq0], self.bits, self.vgroup)
            slots = torch.arange(j0, nq1 // g, device=k.device) % self.n_block_slots
            rows = (slots[:, None] * g + torch.arange(g, device=k.device)).flatten()
            self.kq[:, :, rows], self.ks[:, :, slots], self.km[:, :, slots] = qk
            self.vq[:, :, rows], self.vs[:, :, rows], self.vm[:, :, rows] = qv
        keep = torch.arange(nq1, length, device=k.device) % self.ring_size
        self.rk[:, :, keep], self.rv[:, :, keep] = tail_k[:, :, nq1 - nq0 :], tail_v[:, :, nq1 - nq0 :]
        self.length_t.fill_(length)
        self._host_len = length

    def reset(self) -> None:
        """Empty the store, keeping its buffers (and their addresses, which a captured graph holds)."""
        if self.length_t is not None:
            self.length_t.zero_()
        self._host_len = 0

    def tensors(self) -> Iterator[torch.Tensor]:
        for t in (self.kq, self.ks, self.km, self.vq, self.vs, self.vm, self.rk, self.rv, self.length_t):
            if t is not None:
                yield t

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError("a static (preallocated) KV store serves one batch; beam search is not supported")
