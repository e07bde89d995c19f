"""``QuantizedKVCache``: KIVI-style INT8 / INT4 / INT2 KV cache for transformers models.

>>> cache = QuantizedKVCache(bits=4, config=model.config, max_cache_len=4096)    # doctest: +SKIP
>>> enable_fused_attention(model)   # decode attends straight from the packed cache      # doctest: +SKIP
>>> model.generate(ids, past_key_values=cache, max_new_tokens=128)                       # doctest: +SKIP

Keys are quantized per channel (blocks of ``group_size`` tokens), values per token (groups of
``min(group_size, head_dim)`` channels); the most recent tokens stay in full precision. A block is
quantized exactly once, when it leaves that window, and prefill goes through the same rule, so decode
never re-quantizes the cache (the transformers ``QuantizedCache`` re-quantizes everything each time its
residual fills). With ``max_cache_len`` the stores are preallocated (compiled / CUDA-graph decode);
without it they grow with the sequence and hold exactly what they need. Sliding-window layers
(Mistral, Qwen2 ``layer_types``) keep only the blocks their window can still see. ``share`` makes
layers attend to an earlier layer's cache instead of keeping their own (see :mod:`.share_search`).
"""

from __future__ import annotations

from .. import _hf
from .cache import CompressedKVCache, KVLayer, SharedSlot, layer_count, validate_quant_args
from .layout import AUTO_WINDOW_FRACTION, MAX_AUTO_RESIDUAL, resolve_residual, validate_share  # noqa: F401
from .static_store import StaticQuantStore
from .stores import FullStore, QuantStore


# residual_length="auto": the full-precision window is at most this fraction of the context (2 bits: the window
# carries much of the quality, so it may take a larger share), and at most 128 tokens (KIVI's window)
class QuantizedKVCache(CompressedKVCache):
    """Quantized KV cache (KIVI: per-channel keys, per-token values, full-precision recent window).

    Parameters
    ----------
    bits : 8, 4 or 2 (``None``: full precision, only with ``share``)
    group_size : tokens per key block and (capped at head_dim) channels per value group; one of
        8, 16, 32, 64, 128, 256.
    residual_length : most recent tokens kept in full precision (>= 0), or ``"auto"`` (the default, as in
        :class:`~.config.KVCacheConfig`): sized to the context -- ``max_cache_len``, else ``context``, else the
        length of the first chunk a layer stores (the prompt) -- at most 1/64 of it (1/16 at 2 bits) and 128
        tokens (:func:`~.layout.resolve_residual`).
    config : the model's config (optional): validates that its attention can be served (no MLA or
        cross-attention), finds sliding-window layers and creates one layer per decoder layer.
    num_layers : layer count when no config is given (otherwise layers are created on first use).
    max_cache_len : preallocate every store for this many tokens (compiled / CUDA-graph decode).
    context : expected tokens, only to size ``residual_length="auto"`` when ``max_cache_len`` is not set.
    share : ``{layer: source}`` or ``[(source, layer), ...]``: ``layer`` keeps no cache and attends to
        ``source``'s (an earlier layer).
    """

    def __init__(
        self,
        bits: int | None = 4,
        group_size: int = 64,
        residual_length: int | str = "auto",
        *,
        config=None,
        num_layers: int | None = None,
        max_cache_len: int | None = None,
        context: int | None = None,
        share=None,
    ) -> None:
        known = max_cache_len or context
        # "auto" with no context given: each store sizes its window from the first chunk it holds (the prompt)
        residual = "auto" if residual_length == "auto" and known is None else resolve_residual(
            residual_length, group_size, known, bits)
        if bits is not None:
            validate_quant_args(bits, group_size, 0 if residual == "auto" else residual)
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 1):
            raise ValueError(f"max_cache_len={max_cache_len!r} must be a positive integer")
        n = layer_count(config, num_layers)
        self.share = validate_share(share, n)
        if bits is None and not self.share:
            raise ValueError("bits=None (full precision) is only useful with share=...; use DynamicCache instead")
        if max_cache_len is not None and bits is None:
            raise ValueError("max_cache_len (a preallocated store) needs bits=8, 4 or 2")
        self.bits, self.group_size, self._residual, self.capacity = bits, group_size, residual, max_cache_len
        windows = _hf.layer_windows(config) if config is not None else None
        if n is None:
            if self.share:
                raise ValueError("share=... needs the model's config= (or num_layers=)")
            super().__init__(factory=lambda: KVLayer(self._store(0)), config=config)
            return
        layers, stores = [], {}
        for i in range(n):
            if i in self.share:
                layers.append(KVLayer(SharedSlot(stores[self.share[i]])))
            else:
                stores[i] = self._store(windows[i] if windows else 0)
                layers.append(KVLayer(stores[i]))
        super().__init__(layers=layers, config=config)

    def _store(self, window: int):
        if self.bits is None:
            if window:
                raise ValueError("full-precision shared caches do not support sliding-window layers; set bits")
            return FullStore()
        if self.capacity is not None:
            return StaticQuantStore(self.bits, self.group_size, self._residual, self.capacity, window)
        return QuantStore(self.bits, self.group_size, self._residual, window)

    @property
    def residual_length(self) -> int | str:
        """Tokens kept in full precision; ``"auto"`` until the first store has sized its window."""
        if self._residual != "auto":
            return self._residual
        st = self.layers[0].slot if self.layers else None
        return getattr(st, "residual", "auto")

    def __repr__(self) -> str:
        return (
            f"QuantizedKVCache(bits={self.bits}, group_size={self.group_size}, residual_length={self.residual_length}, "
            f"max_cache_len={self.capacity}, shared_layers={len(self.share)}, layers={len(self.layers)})"
        )

    def stats(self) -> dict:
        """Tokens stored quantized / in full precision (layer 0), bytes held, shared layers."""
        st = self.layers[0].slot if self.layers else None
        tokens = st.length if st is not None else 0
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "residual_length": self.residual_length,
            "max_cache_len": self.capacity,
            "tokens": tokens,
            "quantized_tokens": st.quantized_length if self.bits and tokens else 0,
            "shared": {str(d): s for d, s in sorted(self.share.items())},
            "bytes": self.nbytes(),
        }
