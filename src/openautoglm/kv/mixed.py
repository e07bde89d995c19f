"""``MixedKVCache``: a KV cache whose width is chosen per decoder layer (full precision, INT8, INT4, INT2).

>>> cache = MixedKVCache([8, 4, 4, None, 2, 2, 4, 8], config=model.config)   # doctest: +SKIP
>>> model.generate(ids, past_key_values=cache, max_new_tokens=128)         # doctest: +SKIP

Layers differ in how much KV quantization costs them; a per-layer choice (made by
:func:`openautoglm.auto.compress_to_budget` from measured sensitivities) keeps more bits where they matter.
Each quantized layer is a KIVI store (:class:`.stores.QuantStore`, the same one ``QuantizedKVCache`` uses),
each full-precision layer a :class:`.stores.FullStore`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import _hf
from .cache import CompressedKVCache, KVLayer, validate_quant_args
from .layout import resolve_residual
from .stores import FullStore, QuantStore

FULL = (None, 16)


def normalize_layer_bits(layer_bits: Sequence) -> tuple:
    """``[8, 4, None, 16, ...]`` -> a tuple with ``None`` for full precision; raises on anything else."""
    if isinstance(layer_bits, (str, bytes)) or not isinstance(layer_bits, Sequence) or not layer_bits:
        raise ValueError(f"layer bits must be a non-empty list (one entry per layer), got {layer_bits!r}")
    out = []
    for i, b in enumerate(layer_bits):
        if b in FULL and not isinstance(b, bool):
            out.append(None)
        elif isinstance(b, int) and not isinstance(b, bool) and b in (8, 4, 2):
            out.append(b)
        else:
            raise ValueError(f"layer {i}: KV bits {b!r}; accepted: 8, 4, 2 or None/16 (full precision)")
    return tuple(out)


class MixedKVCache(CompressedKVCache):
    """Per-layer KV cache widths.

    Parameters
    ----------
    layer_bits : one entry per decoder layer: 8, 4 or 2 (KIVI-quantized) or None / 16 (full precision).
    group_size, residual_length : as :class:`QuantizedKVCache` (shared by the quantized layers);
        ``"auto"`` sizes each quantized layer's window to ``context`` for its width (:func:`.quantized.resolve_residual`).
    config : the model's config (optional); its layer count must equal ``len(layer_bits)``.
    context : expected tokens, to size ``residual_length="auto"`` (unknown: each quantized layer sizes its
        window from the first chunk it stores, the prompt).
    """

    def __init__(self, layer_bits: Sequence, group_size: int = 64, residual_length: int | str = "auto", *,
                 config=None, context: int | None = None) -> None:
        self.layer_bits = normalize_layer_bits(layer_bits)
        for b in self.layer_bits:
            if b is not None:
                validate_quant_args(b, group_size, 0 if residual_length == "auto" else residual_length)
        # "auto" with no context: each store sizes its window from the first chunk it holds, as QuantizedKVCache
        windows = [None if b is None else "auto" if residual_length == "auto" and context is None
                   else resolve_residual(residual_length, group_size, context, b) for b in self.layer_bits]
        if config is not None:
            n = _hf.num_layers(config)
            if n != len(self.layer_bits):
                raise ValueError(f"layer_bits has {len(self.layer_bits)} entries; the model has {n} layers")
        self.group_size, self.residual_length = group_size, residual_length
        layers = [KVLayer(FullStore() if b is None else QuantStore(b, group_size, r))
                  for b, r in zip(self.layer_bits, windows)]
        super().__init__(layers=layers, config=config)

    def __repr__(self) -> str:
        bits = ",".join("bf" if b is None else str(b) for b in self.layer_bits)
        return f"MixedKVCache(bits=[{bits}], group_size={self.group_size}, tokens={self.get_seq_length()})"
