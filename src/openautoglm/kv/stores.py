"""Per-layer KV stores: full precision, and KIVI-quantized with a full-precision recent window.

A store holds one layer's keys and values, each ``(batch, kv_heads, seq, head_dim)`` when read.
``read(k_new, v_new)`` returns everything stored followed by the new tokens (exact);
``append(k, v)`` stores new tokens; ``update`` does both, which is what attention needs.
Stores hold only tensors of exactly the size they need (no capacity slack), and drop references to
tensors they no longer need, so ``nbytes`` (the sum of the storages they keep alive) is what the
allocator really holds for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import kernels, packing


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view keeps its whole storage alive)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class _StoreBase:
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
        self._check(k, v)
        out = self.read(k, v)
        self.append(k, v)
        return out

    def reset(self) -> None:
        self.__init__(**self._init_kwargs())

    def _init_kwargs(self) -> dict:
        return {}

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

    def read(self, k_new=None, v_new=None):
        if k_new is None:
            return self.k, self.v
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

    The full-precision tail holds between ``residual`` and ``residual + group - 1`` tokens once the
    sequence is that long. Whenever it reaches ``residual + group`` tokens, its oldest whole blocks are
    quantized (once: a block is never re-quantized) and appended to the packed store. Prefill goes
    through the same rule, so a long prompt leaves the same state as the same tokens decoded one by one.
    """

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128) -> None:
        super().__init__()
        self.bits, self.group, self.residual = bits, group_size, residual_length
        self.vgroup: int | None = None
        self.res_k = self.res_v = None
        self.kq = self.ks = self.km = None  # (b, h, n_blocks, d, group*bits/8), (b, h, n_blocks, d, 1) x2
        self.vq = self.vs = self.vm = None  # (b, h, n_tok, d/vgroup, vgroup*bits/8), (b, h, n_tok, d/vgroup, 1) x2

    def _init_kwargs(self) -> dict:
        return dict(bits=self.bits, group_size=self.group, residual_length=self.residual)

    def _init(self, k, v) -> None:
        b, h, _, d = k.shape
        self.vgroup = min(self.group, d)
        if d % self.vgroup or self.vgroup % (8 // self.bits):
            raise ValueError(
                f"head_dim={d} cannot be cut into value groups of {self.vgroup} channels; "
                f"use a group_size that divides head_dim (e.g. {d})"
            )
        dev = k.device
        pb = self.group * self.bits // 8
        self.res_k = k.new_empty(b, h, 0, d)
        self.res_v = v.new_empty(b, h, 0, v.shape[3])
        self.kq = torch.empty(b, h, 0, d, pb, dtype=torch.uint8, device=dev)
        self.ks = torch.empty(b, h, 0, d, 1, dtype=packing.SCALE_DTYPE, device=dev)
        self.km = torch.empty_like(self.ks)
        nvg = d // self.vgroup
        self.vq = torch.empty(b, h, 0, nvg, self.vgroup * self.bits // 8, dtype=torch.uint8, device=dev)
        self.vs = torch.empty(b, h, 0, nvg, 1, dtype=packing.SCALE_DTYPE, device=dev)
        self.vm = torch.empty_like(self.vs)

    @property
    def length(self) -> int:
        if self.res_k is None:
            return 0
        return self.vq.shape[2] + self.res_k.shape[-2]

    @property
    def quantized_length(self) -> int:
        return 0 if self.vq is None else self.vq.shape[2]

    def read(self, k_new=None, v_new=None):
        if k_new is None:
            k_new, v_new = self.res_k[:, :, :0], self.res_v[:, :, :0]
        return kernels.materialize(
            self.kq, self.ks, self.km, self.res_k, k_new, self.vq, self.vs, self.vm, self.res_v, v_new, self.bits
        )

    def update(self, k, v):
        self._check(k, v)
        out = self.read(k, v)
        n_q = self.vq.shape[2]
        if n_q == 0:  # nothing quantized yet: the returned tensors are exactly the new window
            self._push(*out)
        else:
            self.append(k, v)
        return out

    def append(self, k, v) -> None:
        self._check(k, v)
        self._push(torch.cat([self.res_k, k], dim=-2), torch.cat([self.res_v, v], dim=-2))

    def _push(self, tail_k, tail_v) -> None:
        n = tail_k.shape[-2]
        n_flush = max(0, (n - self.residual) // self.group) * self.group
        if n_flush:
            qk, sk, mk = packing.quantize_keys(tail_k[:, :, :n_flush], self.bits, self.group)
            qv, sv, mv = packing.quantize_values(tail_v[:, :, :n_flush], self.bits, self.vgroup)
            self.kq, self.ks, self.km = (torch.cat([a, b], dim=2) for a, b in zip((self.kq, self.ks, self.km), (qk, sk, mk)))
            self.vq, self.vs, self.vm = (torch.cat([a, b], dim=2) for a, b in zip((self.vq, self.vs, self.vm), (qv, sv, mv)))
            # clone: a slice would keep the whole prefill-sized tail storage alive
            tail_k, tail_v = tail_k[:, :, n_flush:].clone(), tail_v[:, :, n_flush:].clone()
        self.res_k, self.res_v = tail_k, tail_v

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
