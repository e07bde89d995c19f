"""``QuantConfig``: the validated, JSON-round-tripping description of a weight-quantization recipe."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields

from .._util import checks as C

SCHEMES = ("w8a8", "w8a8-fp8", "w8", "w4", "static")
OBSERVERS = ("minmax", "percentile")
KERNELS = ("auto", "triton", "torch", "tinygemm")
LAYOUTS = ("groups", "rows")
PACKS = ("k32", "pairs")
CONFIG_VERSION = 1
_DEFAULT_GROUP = {"w4": 128}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the ``nn.Linear`` layers of a model.

    Parameters
    ----------
    scheme : ``"w8a8"`` (per-channel int8 weights, dynamic per-token int8 activations, int8 GEMM),
        ``"w8a8-fp8"`` (the same with float8 e4m3 weights/activations and ``torch._scaled_mm``),
        ``"w8"`` / ``"w4"`` (weight-only, dequantized inside the matmul), ``"static"`` (int8 weights,
        int8 activations with a per-layer scale calibrated ahead of time).
    group_size : weight group along the input dim (32, 64, 128) or ``None`` for one scale per output
        channel. Default 128 for ``w4``, per-channel otherwise. Only ``w8``/``w4`` accept groups.
    symmetric : symmetric weight codes; default ``False`` for ``w4`` (float offset per group), ``True``
        otherwise (the 8-bit schemes are symmetric only).
    include, exclude : wildcard patterns on module names (``"model.layers.*.mlp.*"``); a Linear is
        quantized when it matches an include and no exclude. ``lm_head`` is excluded by default.
    observer, percentile : activation-range observer of ``static`` (``"minmax"`` or ``"percentile"``
        of ``|x|``).
    kernel : ``"auto"`` (Triton on CUDA when available, else torch ops), ``"triton"``, ``"torch"``, or
        ``"tinygemm"`` (w4 only: decode through ``torch._weight_int4pack_mm``; keeps a second, tinygemm-packed
        copy of the int4 codes on the GPU, +0.25 bytes per weight).
    layout : storage of the w8/w4 scales and zero points. ``"groups"`` (the default for new quantizations):
        group-major ``scale (K/group, N)``, ``zero (K/group, N/2)``, so the kernels read one contiguous row of
        scales per group; ``"rows"``: ``scale (N, K/group)``, ``zero (N/2, K/group)``, the layout of
        checkpoints written before it existed (a recorded config without ``layout`` reads as ``"rows"``).
        Same codes and values either way; both run on the same kernels, no repacking at load.
    pack : order of the w4 codes in their bytes. ``"k32"`` (the default for new quantizations): the order the
        decode kernels read with one shift and one ``lop3`` per code (:func:`~.math.pack_int4_k32`; needs
        in_features % 32 == 0); ``"pairs"``: two consecutive codes a byte (even k in the high nibble), the
        order of checkpoints written before it existed (a recorded config without ``pack`` reads as
        ``"pairs"``). Same codes and values, so the same outputs; chosen at quantization time and recorded
        in the checkpoint, so loading never repacks. Ignored by the other schemes.
    """

    scheme: str = "w8a8"
    group_size: int | None = None
    symmetric: bool | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("lm_head",)
    observer: str = "minmax"
    percentile: float = 99.99
    kernel: str = "auto"
    layout: str = "groups"
    pack: str = "k32"
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        s = self.scheme
        if not isinstance(s, str) or s not in SCHEMES:
            raise ValueError(f"unknown scheme {s!r}; accepted: {', '.join(SCHEMES)}")
        if self.group_size is None and s in _DEFAULT_GROUP:
            object.__setattr__(self, "group_size", _DEFAULT_GROUP[s])
        if self.group_size is not None:
            if s not in ("w8", "w4"):
                raise ValueError(f"scheme {s!r} uses per-channel weight scales; group_size must be None, got {self.group_size!r}")
            C.choice("group_size", self.group_size, (32, 64, 128), optional=True)
        C.boolean("symmetric", self.symmetric, optional=True)
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", s != "w4")
        if not self.symmetric and s != "w4":
            raise ValueError(f"scheme {s!r} is symmetric only; asymmetric weights are offered for w4")
        for name in ("include", "exclude"):
            object.__setattr__(self, name, C.patterns(name, getattr(self, name)))
        C.choice("observer", self.observer, OBSERVERS)
        object.__setattr__(self, "percentile", C.number("percentile", self.percentile, min=50.0, max=100.0, min_open=True))
        C.choice("kernel", self.kernel, KERNELS)
        if self.kernel == "tinygemm" and s != "w4":
            raise ValueError(f"kernel 'tinygemm' is for scheme w4 only, got scheme {s!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; accepted: {', '.join(LAYOUTS)}")
        if self.pack not in PACKS:
            raise ValueError(f"unknown pack {self.pack!r}; accepted: {', '.join(PACKS)}")
        if self.version != CONFIG_VERSION or not C._is_int(self.version):
            raise ValueError(f"QuantConfig version {self.version!r} is not supported (this build reads {CONFIG_VERSION})")

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "w4" else 8

    def matches(self, name: str) -> bool:
        """Whether module ``name`` is selected by the include/exclude patterns."""
        inc = any(fnmatch.fnmatchcase(name, p) for p in self.include)
        return inc and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        if not isinstance(d, dict):
            raise TypeError(f"QuantConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}; accepted: {sorted(known)}")
        d = dict(d)
        d.setdefault("layout", "rows")  # recorded before the layout existed: the row-major scales of then
        d.setdefault("pack", "pairs")   # recorded before the k32 order existed: two codes a byte
        for k in ("include", "exclude"):
            if k in d and isinstance(d[k], list):
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))
