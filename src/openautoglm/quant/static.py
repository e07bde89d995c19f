"""Static (calibrated) INT8: observe activation ranges, then quantize with one fixed scale per layer.

>>> sq = StaticQuantizer(observer="percentile", percentile=99.99)      # doctest: +SKIP
>>> with sq.calibrate(model):                                           # hooks removed on exit
...     for batch in batches: model(batch)
>>> sq.quantize(model)                # or sq.quantize(model) alone: calibrates on the held-out text
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .._util.finite import NonFiniteError, check_weights
from ..evaluate import heldout_token_ids
from ..hub import load_tokenizer
from .api import _apply, select_linears
from .config import QuantConfig

log = logging.getLogger(__name__)
_MAX_SAMPLE = 1 << 20  # elements per batch fed to the percentile observer


class Observer:
    """Running range of ``|x|`` of one layer's input: the max (``minmax``) or the mean per-batch percentile."""

    def __init__(self, kind: str, percentile: float, name: str = "") -> None:
        self.kind, self.percentile, self.name = kind, percentile, name
        self.value, self.batches = 0.0, 0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().flatten()
        if not torch.isfinite(a).all():  # a NaN would vanish in max() and an Inf make the scale infinite
            raise NonFiniteError(f"static calibration: the input of {self.name or 'a layer'} holds "
                                 f"{int((~torch.isfinite(a)).sum())} NaN/Inf values of {a.numel()}; the model is not "
                                 "modified -- check the calibration text and the model's weights")
        if self.kind == "minmax":
            self.value = max(self.value, float(a.max()))
        else:
            if a.numel() > _MAX_SAMPLE:
                a = a[:: a.numel() // _MAX_SAMPLE + 1]
            q = float(torch.quantile(a, self.percentile / 100.0))
            self.value = (self.value * self.batches + q) / (self.batches + 1)
        self.batches += 1

    def scale(self) -> float:
        """Symmetric int8 activation scale ``range / 127``."""
        return max(self.value, 1e-8) / 127.0


class StaticQuantizer:
    """Calibrated INT8 weights + activations (``QuantConfig(scheme="static")``).

    Parameters
    ----------
    observer : ``"minmax"`` (largest ``|x|`` seen) or ``"percentile"`` (the ``percentile`` of ``|x|``,
        averaged over calibration batches; clips rare outliers).
    include, exclude : wildcard module patterns, as in :class:`QuantConfig`.
    """

    def __init__(self, observer: str = "minmax", percentile: float = 99.99, *, include=("*",),
                 exclude=("lm_head",)) -> None:
        self.config = QuantConfig(scheme="static", observer=observer, percentile=percentile,
                                  include=tuple(include), exclude=tuple(exclude))
        self.observers: dict[str, Observer] = {}

    @contextlib.contextmanager
    def calibrate(self, model: nn.Module):
        """Record the input ranges of the selected Linear layers while the block runs (hooks removed after)."""
        names, _ = select_linears(model, self.config)
        check_weights({n: model.get_submodule(n) for n in names}, "static calibration")
        handles = []
        for name in names:
            obs = self.observers.setdefault(name, Observer(self.config.observer, self.config.percentile, name))
            handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, obs=obs: obs.update(args[0])))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def calibrate_on_text(self, model: nn.Module, tokenizer=None, text: str | None = None, max_tokens: int = 4096,
                          seq_len: int = 512) -> None:
        """Run ``model`` over ``text`` (default: the last ``max_tokens`` tokens of the bundled held-out text,
        away from the start that :func:`openautoglm.evaluate.perplexity` reads) under :meth:`calibrate`."""
        batches = calibration_batches(tokenizer or _default_tokenizer(model), text, max_tokens, seq_len)
        device = next(model.parameters()).device
        with self.calibrate(model):
            for ids in batches:
                model(ids.to(device))

    def quantize(self, model: nn.Module, *, tokenizer=None, text: str | None = None, max_tokens: int = 4096,
                 progress=None) -> nn.Module:
        """Quantize in place with the calibrated scales (calibrating on ``text`` first if nothing was observed)."""
        if not self.observers:
            self.calibrate_on_text(model, tokenizer, text, max_tokens)
        names, _ = select_linears(model, self.config)
        missing = [n for n in names if n not in self.observers or not self.observers[n].batches]
        if missing:
            raise ValueError(f"no calibration data reached {missing[:3]}; run the model inside calibrate() first")
        scales = {n: self.observers[n].scale() for n in names}
        _apply(model, self.config, progress=progress, act_scales=scales)
        return model


def calibration_batches(tokenizer, text: str | None = None, max_tokens: int = 4096, seq_len: int = 512) -> list[torch.Tensor]:
    """Token windows the static observers see: the last ``max_tokens`` tokens of the bundled held-out text
    (or the first ``max_tokens`` of ``text``), cut into ``(1, seq_len)`` batches (the last may be shorter)."""
    ids = heldout_token_ids(tokenizer, text)
    ids = ids[-max_tokens:] if text is None else ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("calibration text is empty after tokenization")
    return [ids[start:start + seq_len].unsqueeze(0) for start in range(0, ids.numel(), seq_len)]


def _default_tokenizer(model: nn.Module):
    src = getattr(model, "_openautoglm_source", None) or getattr(model, "name_or_path", None)
    try:
        return load_tokenizer(src) if src else load_tokenizer("open-autoglm-base")
    except Exception:  # noqa: BLE001 - fall back to the bundled tokenizer
        return load_tokenizer("open-autoglm-base")
