"""``KVCacheConfig``: a validated, JSON round-tripping description of a compressed KV cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .. import hub
from .._util import checks as C
from .cache import validate_quant_args
from .layout import resolve_residual
from .mixed import MixedKVCache, normalize_layer_bits
from .quantized import QuantizedKVCache
from .sharing import CrossLayerKVCache


@dataclass(frozen=True)
class KVCacheConfig:
    """Which KV cache to build for a model.

    bits : None (full precision), 8, 4 or 2 (KIVI quantization), or one of those per decoder layer
        (a list/tuple: :class:`.mixed.MixedKVCache`)
    group_size, residual_length : quantization group and full-precision window (see QuantizedKVCache);
        ``residual_length="auto"`` sizes the window to the context (at most 1/64 of it, 1/16 at 2 bits, up to 128).
    share : merge adjacent layers from ``share_start`` on (MiniCache, CrossLayerKVCache), ``share_threshold``
        the cosine above which a token's directions are shared
    share_layers : calibrated sharing, ``((source, layer), ...)``: ``layer`` keeps no cache and attends to
        the earlier ``source``'s (from :func:`openautoglm.kv.share_search.search_sharing`)
    """

    bits: int | None = None
    group_size: int = 64
    residual_length: int | str = "auto"
    share: bool = False
    share_start: int | None = None
    share_threshold: float = 0.9
    share_layers: tuple[tuple[int, int], ...] = ()
    version: int = 2

    def __post_init__(self) -> None:
        residual = 0 if self.residual_length == "auto" else self.residual_length
        if isinstance(self.bits, (list, tuple)):
            object.__setattr__(self, "bits", normalize_layer_bits(self.bits))
            for b in self.bits:
                if b is not None:
                    validate_quant_args(b, self.group_size, residual)
            if self.share or self.share_layers:
                raise ValueError("per-layer KV bits and cross-layer sharing cannot be combined; pick one")
        elif self.bits is not None:
            validate_quant_args(self.bits, self.group_size, residual)
        C.boolean("share", self.share)
        C.integer("share_start", self.share_start, min=0, optional=True)
        object.__setattr__(self, "share_threshold", C.number("share_threshold (a cosine)", self.share_threshold,
                                                             min=-1.0, max=1.0))
        if not C._is_int(self.version) or self.version != 2:
            raise ValueError(f"KVCacheConfig version {self.version!r} is not supported (this build writes 2; "
                             "version-1 files are read by KVCacheConfig.from_dict)")
        try:
            pairs = tuple(tuple(int(x) for x in p) for p in self.share_layers)
        except (TypeError, ValueError):
            raise ValueError(f"share_layers={self.share_layers!r} must be (source, layer) pairs of integers") from None
        if any(len(p) != 2 or not 0 <= p[0] < p[1] for p in pairs):
            raise ValueError(f"share_layers={self.share_layers!r} must be (source, layer) pairs with source < layer")
        if len({p[1] for p in pairs}) != len(pairs):
            raise ValueError(f"share_layers={self.share_layers!r}: a layer can read only one source")
        object.__setattr__(self, "share_layers", pairs)
        if pairs and self.share:
            raise ValueError("share (MiniCache merging) and share_layers (calibrated sharing) are exclusive")

    @property
    def compressed(self) -> bool:
        if isinstance(self.bits, tuple):
            return any(b is not None for b in self.bits)
        return self.bits is not None or self.share or bool(self.share_layers)

    def label(self) -> str:
        parts = []
        if isinstance(self.bits, tuple):
            parts.append("per-layer[" + ",".join("bf" if b is None else f"int{b}" for b in self.bits) + "]")
        elif self.bits is not None:
            parts.append(f"int{self.bits}")
        if self.share:
            parts.append(f"minicache(start={self.share_start},thr={self.share_threshold})")
        if self.share_layers:
            parts.append("share(" + ",".join(f"{s}->{d}" for s, d in self.share_layers) + ")")
        return "+".join(parts) or "full-precision"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["share_layers"] = [list(p) for p in self.share_layers]
        if isinstance(self.bits, tuple):
            d["bits"] = list(self.bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KVCacheConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown KVCacheConfig keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        d["share_layers"] = tuple(tuple(p) for p in d.get("share_layers", ()))
        version = d.get("version", 1)
        if not C._is_int(version) or version not in (1, 2):
            raise ValueError(f"KVCacheConfig version {version!r} is not supported (this build reads 1 and 2)")
        d["version"] = cls.version  # version 1 (no share_layers, no "auto" window) reads as the same cache
        return cls(**d)

    def build(self, model_config, *, max_cache_len: int | None = None, context: int | None = None):
        """A fresh cache for a model with ``model_config``.

        max_cache_len : preallocate quantized stores for this many tokens (compiled / CUDA-graph decode)
        context : expected tokens (sizes ``residual_length="auto"`` when ``max_cache_len`` is not given)

        Returns a transformers ``DynamicCache`` when nothing is compressed.
        """
        if self.share:

            return CrossLayerKVCache(
                self.share_start, self.share_threshold, config=model_config, bits=self.bits,
                group_size=self.group_size,
                residual_length=self.residual_length if self.residual_length == "auto" and not (max_cache_len or context)
                else resolve_residual(self.residual_length, self.group_size, max_cache_len or context, self.bits),
            )
        if isinstance(self.bits, tuple):
            return MixedKVCache(self.bits, self.group_size, self.residual_length, config=model_config,
                                context=max_cache_len or context)
        if self.bits is not None or self.share_layers:
            return QuantizedKVCache(self.bits, self.group_size, self.residual_length, config=model_config,
                                    max_cache_len=max_cache_len if self.bits is not None else None, context=context,
                                    share=list(self.share_layers))
        from transformers import DynamicCache

        return DynamicCache(config=model_config)


@hub.register_rebuilder("kv_cache")
def _rebuild_kv(model, spec: dict) -> None:
    """A runtime setting: nothing to rebuild in the weights; remembered on the model for generate/eval."""
    model.kv_cache_config = KVCacheConfig.from_dict(spec["config"])
