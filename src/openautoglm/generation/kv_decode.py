"""The quantized KV cache inside :class:`openautoglm.generation.generator.Generator` (compiled layer, CUDA-graph step).

``Generator(model, kv=KVCacheConfig(bits=4))`` keeps one :class:`~.static_store.StaticQuantStore` per
layer (none for a layer that reads an earlier layer's cache) instead of full-precision K/V buffers. The
decode layer step (:func:`layer_decode`) appends the token with the device append kernel and attends with
the fused decode kernel: both custom ops, so the step compiles with ``fullgraph=True``, the compiled graph
is shared by every layer (the stores are passed as tensors, their layout as constants) and the whole
step is captured in the CUDA graph. Prefill (from an empty cache) runs eagerly: exact causal attention over
the prompt, then the prompt's K/V go into the stores (quantized once, by the same rule as decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _hf
from ..kv.config import KVCacheConfig
from ..kv.kernels import ops
from ..kv.layout import resolve_residual, validate_share
from ..kv.static_store import StaticQuantStore
from ..kv.stores import storage_bytes
from .block import finish, qkv


def layer_decode(layer: nn.Module, h, cos, sin, rope, kq, ks, km, vq, vs, vm, rk, rv, length, layout: list,
                 append: bool):
    """One decoder layer for one new token per sequence, reading (and, if ``append``, writing) a quantized store."""
    q, k, v = qkv(layer, h, cos, sin, rope)
    view = ops.StoreView(kq, ks, km, vq, vs, vm, rk, rv, length, *ops._unlayout(layout))
    if append:
        ops.append_token(view, k, v)
        length.add_(1)
    o = ops.decode_attention(view, q, None, layer.self_attn.scaling)
    return finish(layer, h, o)


class KVStores:
    """Per-layer quantized stores of a Generator for one (batch, length) shape."""

    @staticmethod
    def check(kv) -> None:
        if not isinstance(kv, KVCacheConfig):
            raise TypeError(f"kv={kv!r} must be an openautoglm.kv.KVCacheConfig")
        if kv.bits is None or kv.share:
            raise ValueError("Generator(kv=...) takes a quantized cache (bits=8, 4 or 2), optionally with "
                             "share_layers; MiniCache merging (share=True) runs with model.generate")

    def __init__(self, kv: KVCacheConfig, config, batch: int, length: int, device, dtype) -> None:
        self.check(kv)
        # one decode graph per (batch, length) shape and per kind of layer (own store / shared): make room
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        n = _hf.num_layers(config)
        self.share = validate_share(list(kv.share_layers), n)
        residual = resolve_residual(kv.residual_length, kv.group_size, length, kv.bits)
        h, d = _hf.num_kv_heads(config), _hf.head_dim(config)
        self.stores: list[StaticQuantStore] = []
        own: dict[int, StaticQuantStore] = {}
        for i in range(n):
            if i in self.share:
                self.stores.append(own[self.share[i]])
                continue
            st = StaticQuantStore(kv.bits, kv.group_size, residual, capacity=length)
            st._check(torch.empty(batch, h, 0, d, device=device, dtype=dtype), torch.empty(batch, h, 0, d, device=device,
                                                                                          dtype=dtype))
            own[i] = st
            self.stores.append(st)
        self.layouts = [[int(x) for x in st.view().layout()] for st in self.stores]

    def args(self, i: int) -> tuple:
        st = self.stores[i]
        return (st.kq, st.ks, st.km, st.vq, st.vs, st.vm, st.rk, st.rv, st.length_t, self.layouts[i], i not in self.share)

    def reset(self) -> None:
        for st in self.stores:
            st.reset()

    def nbytes(self) -> int:
        return storage_bytes(t for st in self.stores for t in st.tensors())

    @torch.no_grad()
    def prefill_layer(self, i: int, layer: nn.Module, h, cos, sin, rope, exact: dict):
        """Eager prefill of layer ``i`` from an empty cache: exact causal attention over the prompt."""
        q, k, v = qkv(layer, h, cos, sin, rope)
        if i in self.share:
            k, v = exact[self.share[i]]
        else:
            self.stores[i].append(k, v)
            if i in self.share.values():  # a later layer attends to this layer's prompt K/V
                exact[i] = (k, v)
        grp = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.self_attn.scaling,
                                           enable_gqa=grp > 1)
        return finish(layer, h, o.transpose(1, 2))
