"""``QuantizedKVCache``: KIVI-style INT8 / INT4 / INT2 KV cache for transformers models.

>>> cache = QuantizedKVCache(bits=4, group_size=64, residual_length=128, config=model.config)  # doctest: +SKIP
>>> model.generate(ids, past_key_values=cache, max_new_tokens=128)                          # doctest: +SKIP

Keys are quantized per channel (blocks of ``group_size`` tokens), values per token (groups of
``min(group_size, head_dim)`` channels); the ``residual_length`` most recent tokens stay in full
precision. A block is quantized exactly once, when it leaves that window, and prefill goes through
the same rule, so decode never re-quantizes the cache (the transformers ``QuantizedCache``
re-quantizes everything each time its residual fills).
"""

from __future__ import annotations

from functools import partial

from .cache import CompressedKVCache, KVLayer, layer_count, validate_quant_args
from .stores import QuantStore


def _quant_layer(bits, group_size, residual_length) -> KVLayer:
    return KVLayer(QuantStore(bits, group_size, residual_length))


class QuantizedKVCache(CompressedKVCache):
    """Quantized KV cache (KIVI: per-channel keys, per-token values, full-precision recent window).

    Parameters
    ----------
    bits : 8, 4 or 2
    group_size : tokens per key block and (capped at head_dim) channels per value group; one of
        8, 16, 32, 64, 128, 256.
    residual_length : most recent tokens kept in full precision (>= 0).
    config : the model's config (optional): validates that its attention can be served
        (no sliding window, MLA or cross-attention) and creates one layer per decoder layer.
    num_layers : layer count when no config is given (otherwise layers are created on first use).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        residual_length: int = 128,
        *,
        config=None,
        num_layers: int | None = None,
    ) -> None:
        validate_quant_args(bits, group_size, residual_length)
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        n = layer_count(config, num_layers)
        make = partial(_quant_layer, bits, group_size, residual_length)
        if n is None:
            super().__init__(factory=make, config=config)
        else:
            super().__init__(layers=[make() for _ in range(n)], config=config)

    def __repr__(self) -> str:
        return (
            f"QuantizedKVCache(bits={self.bits}, group_size={self.group_size}, "
            f"residual_length={self.residual_length}, layers={len(self.layers)}, tokens={self.get_seq_length()})"
        )

    def stats(self) -> dict:
        """Tokens stored quantized / in full precision (layer 0) and bytes held."""
        st = self.layers[0].slot if self.layers else None
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "residual_length": self.residual_length,
            "tokens": self.get_seq_length(),
            "quantized_tokens": st.quantized_length if st else 0,
            "bytes": self.nbytes(),
        }
