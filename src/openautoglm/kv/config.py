"""``KVCacheConfig``: a validated, JSON round-tripping description of a compressed KV cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .. import _checks as C
from .cache import validate_quant_args


@dataclass(frozen=True)
class KVCacheConfig:
    """Which KV cache to build for a model.

    bits : None (full precision), 8, 4 or 2 (KIVI quantization)
    group_size, residual_length : quantization group and full-precision window (see QuantizedKVCache)
    share : merge adjacent layers from ``share_start`` on (CrossLayerKVCache), ``share_threshold`` the
        cosine above which a token's directions are shared
    """

    bits: int | None = None
    group_size: int = 64
    residual_length: int = 128
    share: bool = False
    share_start: int | None = None
    share_threshold: float = 0.9
    version: int = 1

    def __post_init__(self) -> None:
        if self.bits is not None:
            validate_quant_args(self.bits, self.group_size, self.residual_length)
        C.boolean("share", self.share)
        C.integer("share_start", self.share_start, min=0, optional=True)
        object.__setattr__(self, "share_threshold", C.number("share_threshold (a cosine)", self.share_threshold,
                                                             min=-1.0, max=1.0))
        if self.version != 1 or not C._is_int(self.version):
            raise ValueError(f"KVCacheConfig version {self.version!r} is not supported (this build reads 1)")

    @property
    def compressed(self) -> bool:
        return self.bits is not None or self.share

    def label(self) -> str:
        parts = []
        if self.bits is not None:
            parts.append(f"int{self.bits}")
        if self.share:
            parts.append(f"share(start={self.share_start},thr={self.share_threshold})")
        return "+".join(parts) or "full-precision"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KVCacheConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown KVCacheConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def build(self, model_config):
        """A fresh cache for a model with ``model_config`` (a transformers ``DynamicCache`` if not compressed)."""
        if self.share:
            from .sharing import CrossLayerKVCache

            return CrossLayerKVCache(
                self.share_start, self.share_threshold, config=model_config, bits=self.bits,
                group_size=self.group_size, residual_length=self.residual_length,
            )
        if self.bits is not None:
            from .quantized import QuantizedKVCache

            return QuantizedKVCache(self.bits, self.group_size, self.residual_length, config=model_config)
        from transformers import DynamicCache

        return DynamicCache(config=model_config)
