"""transformers ``Cache`` glue shared by the compressed KV caches.

Each cache is a list of :class:`KVLayer` objects (transformers' public cache-layer API), each of
which forwards ``update`` to a *slot*: a per-layer store (:mod:`.stores`, :mod:`.static_store`), a
:class:`SharedSlot` reading another layer's store (calibrated cross-layer sharing) or one side of a
MiniCache pair (:mod:`.sharing`). The caches therefore work wherever transformers takes a ``Cache``:
``model.generate(..., past_key_values=cache)`` and a plain forward loop. When the model runs the fused
attention function (:func:`~openautoglm.kv.attention.enable_fused_attention`), a one-token step of a
quantized store is attended straight from the packed store.
"""

from __future__ import annotations

import logging

import torch

from .. import _hf
from .._util import checks as C
from .attention import fused_enabled, set_pending
from .stores import storage_bytes

log = logging.getLogger(__name__)

_Cache, _CacheLayerMixin = _hf.cache_base_classes()

SUPPORTED_GROUP_SIZES = (8, 16, 32, 64, 128, 256)


class SharedSlot:
    """A layer that stores nothing and attends to an earlier layer's store (KVSharer-style sharing).

    The source layer runs first in every forward, so its store already holds this step's tokens.
    """

    def __init__(self, source) -> None:
        self.source = source

    @property
    def length(self) -> int:
        return self.source.length

    @property
    def batch(self):
        return self.source.batch

    @property
    def window(self) -> int:
        return getattr(self.source, "window", 0)

    def update(self, k, v):
        if self.source.batch is None:
            raise RuntimeError("a shared layer was updated before the layer whose KV it reads")
        return self.source.read_with(k[:, :, :0], v[:, :, :0])  # the source already holds this step's tokens

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.source.mask_sizes(query_length)

    def reset(self) -> None:
        pass

    def tensors(self):
        return iter(())

    def map_batch(self, fn) -> None:
        pass  # the source layer's store is reordered once, by its own layer


class KVLayer(_CacheLayerMixin):
    """One decoder layer's cache: a transformers cache layer backed by an openautoglm slot."""

    is_croppable = False

    def __init__(self, slot, layer_idx: int = -1, owner=None) -> None:
        super().__init__()
        self.slot, self.layer_idx, self.owner = slot, layer_idx, owner

    def __repr__(self) -> str:
        return f"KVLayer({type(self.slot).__name__}, tokens={self.get_seq_length()})"

    @property
    def is_sliding(self) -> bool:
        return bool(getattr(self.slot, "window", 0))

    @property
    def is_compileable(self) -> bool:
        src = self.slot.source if isinstance(self.slot, SharedSlot) else self.slot
        return hasattr(src, "length_tensor")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: (batch, kv_heads, new_tokens, head_dim) -> all keys, all values.

        With the fused attention function and one new token, a quantized store keeps the token and is
        handed to the attention call (the returned tensors are then just the new token's).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cfg = getattr(self.owner, "model_config", None)
        if key_states.shape[-2] == 1 and fused_enabled(cfg):
            src = self.slot.source if isinstance(self.slot, SharedSlot) else self.slot
            if hasattr(src, "decode"):
                if src is self.slot:
                    src.append(key_states, value_states)
                set_pending(self.layer_idx, src)
                return key_states, value_states
        return self.slot.update(key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slot.mask_sizes(query_length)

    def get_seq_length(self):
        src = self.slot.source if isinstance(self.slot, SharedSlot) else self.slot
        if hasattr(src, "length_tensor"):
            return src.length_tensor()  # a device tensor, like transformers' static layers (no host sync)
        return src.length

    def get_max_length(self) -> int:
        src = self.slot.source if isinstance(self.slot, SharedSlot) else self.slot
        return getattr(src, "capacity", -1)

    def get_max_cache_shape(self) -> int:  # transformers < 5.16 name of get_max_length
        return self.get_max_length()

    @property
    def batch_size(self) -> int:
        return -1 if self.slot.batch is None else self.slot.batch

    def reset(self) -> None:
        self.slot.reset()
        self.is_initialized = False

    def offload(self):
        raise NotImplementedError("offloading is not supported by the compressed KV caches")

    prefetch = offload

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the compressed KV caches cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.slot.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.slot.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.slot.map_batch(lambda t: t[indices])


class CompressedKVCache(_Cache):
    """Common base: byte accounting and validation of the model it serves."""

    def __init__(self, layers: list[KVLayer] | None = None, factory=None, config=None) -> None:
        if config is not None:
            _hf.check_kv_cache_support(config)
        if layers is not None:
            for i, layer in enumerate(layers):
                layer.layer_idx, layer.owner = i, self
            super().__init__(layers=layers)
        else:
            super().__init__(layer_class_to_replicate=factory)
        self.model_config = config

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:  # layers created on first use (no config given)
            layer = self.layer_class_to_replicate()
            layer.layer_idx, layer.owner = len(self.layers), self
            self.layers.append(layer)
        return self.layers[layer_idx].update(key_states, value_states)

    @property
    def batch_size(self) -> int:
        sizes = {layer.batch_size for layer in self.layers if layer.batch_size > 0}
        return sizes.pop() if len(sizes) == 1 else -1

    def tensors(self):
        for layer in self.layers:
            yield from layer.slot.tensors()

    def nbytes(self) -> int:
        """Bytes held by the cache: the sum of the distinct storages of every tensor it keeps."""
        return storage_bytes(self.tensors())

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()


def validate_quant_args(bits, group_size, residual_length) -> None:
    C.choice("bits", bits, (8, 4, 2))
    C.choice("group_size", group_size, SUPPORTED_GROUP_SIZES)
    if not C._is_int(residual_length) or residual_length < 0:
        raise ValueError(f"residual_length={residual_length!r} must be an integer >= 0")


def layer_count(config, num_layers: int | None) -> int | None:
    if num_layers is not None:
        return C.integer("num_layers", num_layers, min=1)
    return _hf.num_layers(config) if config is not None else None
