"""How a compressed KV cache is laid out, decided before any tensor exists: the full-precision residual
window of the quantized caches and the map of layers that read an earlier layer's cache.

Pure Python (no torch, no transformers), so the estimator can size caches without importing the caches.
"""

from __future__ import annotations

AUTO_WINDOW_FRACTION = {8: 64, 4: 64, 2: 16}
MAX_AUTO_RESIDUAL = 128


def resolve_residual(residual_length, group_size: int, context: int | None, bits: int | None = 4) -> int:
    """``"auto"``: the largest multiple of ``group_size`` that is at most ``context / 64`` (``/ 16`` at 2 bits),
    capped at 128; 128 when the context is unknown. An integer is returned as is."""
    if residual_length != "auto":
        return residual_length
    if context is None:
        return MAX_AUTO_RESIDUAL
    frac = AUTO_WINDOW_FRACTION.get(bits, 64)
    return min(MAX_AUTO_RESIDUAL, context // frac // group_size * group_size)


def validate_share(share, n_layers: int | None) -> dict[int, int]:
    """``{layer: source layer}`` with every source earlier than its layer and itself not shared."""
    if not share:
        return {}
    pairs = dict(share) if isinstance(share, dict) else {int(d): int(s) for s, d in share}
    for dst, src in pairs.items():
        if not (isinstance(dst, int) and isinstance(src, int)) or not 0 <= src < dst:
            raise ValueError(f"share {src}->{dst}: a layer can only read the KV cache of an earlier layer")
        if n_layers is not None and dst >= n_layers:
            raise ValueError(f"share {src}->{dst}: the model has {n_layers} layers")
        if src in pairs:
            raise ValueError(f"share {src}->{dst}: layer {src} reads another layer's cache, so it has none to share")
    return pairs
