"""``ShardConfig``: a validated, JSON round-tripping description of a tensor-parallel split."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

VOCAB_MODES = ("shard", "replicate")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class ShardConfig:
    """How :func:`openautoglm.parallel.shard` splits a model over the ranks of a process group.

    Parameters
    ----------
    tp_size : ranks that share one copy of the model; ``None`` = the world size of ``torch.distributed``
        (1 when it is not initialized).
    vocab : ``"shard"`` splits the input embedding and ``lm_head`` by vocabulary rows (the embedding
        all-reduces its output, ``lm_head`` all-gathers the logits so every rank sees all of them);
        ``"replicate"`` keeps both whole on every rank. A vocabulary that ``tp_size`` does not divide is
        replicated (and said so in the plan's notes).
    allow_uneven : split layers that cannot be split evenly (a ``tp_size`` that does not divide the heads, the
        uneven GQA groups of a pruned model, quantization groups that an even cut would break) into unequal but
        correct parts cut at head / group boundaries. Off by default: such a split is an error naming the layer.
    """

    tp_size: int | None = None
    vocab: str = "shard"
    allow_uneven: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.tp_size is not None and (isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int)
                                         or self.tp_size < 1):
            raise ValueError(f"tp_size={self.tp_size!r} must be a positive integer or None (the world size)")
        if self.vocab not in VOCAB_MODES:
            raise ValueError(f"vocab={self.vocab!r}; accepted: {', '.join(VOCAB_MODES)}")
        if not isinstance(self.allow_uneven, bool):
            raise TypeError(f"allow_uneven={self.allow_uneven!r} must be a bool")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"ShardConfig version {self.version} is not supported (this build reads {CONFIG_VERSION})")

    @classmethod
    def resolve(cls, tp_size: int | None = None, config: ShardConfig | None = None) -> ShardConfig:
        """The config of a call that passed ``tp_size`` (short form) and/or ``config``."""
        if config is None:
            return cls(tp_size=tp_size)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a ShardConfig, got {type(config).__name__}")
        if tp_size is not None and config.tp_size not in (None, tp_size):
            raise ValueError(f"tp_size={tp_size} conflicts with config.tp_size={config.tp_size}; pass one of them")
        if tp_size is not None and config.tp_size is None:
            return cls(**{**config.to_dict(), "tp_size": tp_size})
        return config

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardConfig:
        if not isinstance(d, dict):
            raise TypeError(f"ShardConfig.from_dict needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ShardConfig fields {unknown}; accepted: {[f.name for f in fields(cls)]}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardConfig:
        return cls.from_dict(json.loads(text))
