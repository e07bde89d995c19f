"""Module surgery: ``quantize(model, QuantConfig(...))`` and ``DynamicQuantizer.quantize(model, bits=8)``.

Walks a model, replaces the selected ``nn.Linear`` layers (and transformers ``Conv1D``, GPT-2's transposed Linear)
by the quantized classes of :mod:`.linear`,
reports the skipped ones, and records the recipe in the model config (``hub.record_transform``) so
``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` rebuild the same modules without ever
materializing full-precision weights (rebuilder ``"quantize"`` below).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from .. import _hf, hub
from .._util.finite import check_weights
from .._util.modules import model_bytes, model_device, set_module, tied_names
from .config import QuantConfig
from .experts import QuantExperts
from .kernels import fastest_w8a8
from .linear import LINEAR_CLASSES, QuantLinear
from .report import full_precision, log_full_precision

log = logging.getLogger(__name__)
TRANSFORM = "quantize"
Progress = Callable[[str, int, int], None]


@dataclass
class QuantResult:
    """What :func:`quantize` did: the modules quantized, the ones skipped (name -> reason), bytes, and every float
    tensor above 1% of the model's bytes left in full precision, with the reason (:mod:`.report`)."""

    config: QuantConfig
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    full_precision: dict[str, dict] = field(default_factory=dict)  # big float tensors left: name -> bytes, share, reason

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "quantized": self.quantized, "skipped": self.skipped,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "full_precision": self.full_precision}


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of ``model`` is a quantized module (decided from the modules, not the config)."""
    return any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Names of the quantized layers of ``model`` -> their scheme (quantized experts by their module's name)."""
    out, inside = {}, ()
    for n, m in model.named_modules():
        if inside and n.startswith(inside):
            continue
        if isinstance(m, QuantExperts):
            out[n], inside = m.scheme, n + "."
        elif isinstance(m, QuantLinear):
            out[n] = m.scheme
    return out


def new_quantized(module: nn.Module, config: QuantConfig) -> nn.Module:
    """The quantized replacement of a Linear-like layer or of a transformers experts module, filled."""
    if _hf.moe.is_experts(module):
        return QuantExperts.from_experts(module, config)
    return LINEAR_CLASSES[config.scheme].from_linear(_hf.as_linear(module), config)  # Conv1D: as its Linear


def supports(module: nn.Module, config: QuantConfig) -> str | None:
    """``None`` when ``module`` (a Linear-like layer or an experts module) can be quantized with ``config``, else why."""
    if _hf.moe.is_experts(module):
        return QuantExperts.supports(module, config)
    shape = SimpleNamespace(in_features=_hf.in_features(module), out_features=_hf.out_features(module))
    return LINEAR_CLASSES[config.scheme].supports(shape, config)


def empty_quantized(module: nn.Module, config: QuantConfig, device="meta") -> nn.Module:
    """The empty (meta) quantized replacement of ``module`` (a Linear-like layer or an experts module)."""
    if _hf.moe.is_experts(module):
        return QuantExperts.empty(module, config, device=device)
    lin = _hf.as_linear(module)
    if lin is None:
        raise ValueError(f"cannot quantize a {type(module).__name__}")
    return LINEAR_CLASSES[config.scheme].empty(lin, config, device=device)


def select_linears(model: nn.Module, config: QuantConfig, *, skip_quantized: bool = False
                   ) -> tuple[list[str], dict[str, str]]:
    """Names of the Linear layers to quantize, and of the matching ones that cannot be (with reasons).

    The one selector of the package: ``quantize``, quantize-on-load, the static calibration and the estimator's
    per-module recipes (:func:`openautoglm.memory.mixed.apply_quant_structure`) all choose layers here --
    plain ``nn.Linear`` s and GPT-2's ``Conv1D`` s (:func:`openautoglm._hf.is_linear_like`) that match the
    patterns, are not tied to the input embeddings and have a shape the scheme supports.

    Raises ``ValueError`` when the patterns select layers that are already quantized (a partly quantized
    model can be quantized further, but only on its remaining float layers), unless ``skip_quantized``: then
    they are passed over, as a later config of a per-module recipe does.
    """
    cls = LINEAR_CLASSES[config.scheme]
    tied = tied_names(model)
    already = {n: s for n, s in quantized_layers(model).items() if config.matches(n)}
    if already and not skip_quantized:
        names = sorted(already)
        shown = ", ".join(f"{n} ({already[n]})" for n in names[:4])
        shown += f" and {len(names) - 4} more" if len(names) > 4 else ""
        raise ValueError(
            f"model is already quantized on {len(names)} of the selected layers: {shown}; quantize only the "
            "remaining float layers (narrow include= or add them to exclude=), or reload the full-precision model"
        )
    chosen, skipped = [], {}
    for name, mod in model.named_modules():
        if not _hf.is_linear_like(mod) or not config.matches(name):  # nn.Linear, or GPT-2's Conv1D
            continue
        shape = SimpleNamespace(in_features=_hf.in_features(mod), out_features=_hf.out_features(mod))
        reason = "weight tied to the input embeddings" if name in tied else cls.supports(shape, config)
        if reason:
            skipped[name] = reason
        else:
            chosen.append(name)
    return chosen, skipped


def select_experts(model: nn.Module, config: QuantConfig) -> tuple[list[str], dict[str, str]]:
    """Names of the fused-experts modules (``model.layers.N.mlp.experts``, :mod:`openautoglm._hf.moe`) to quantize,
    and of the matching ones that cannot be (with reasons). The routers stay in full precision (a few thousand
    parameters per layer, and every token's expert choice depends on them); shared experts are plain MLP Linears,
    chosen by :func:`select_linears`."""
    chosen, skipped = [], {}
    for name, mod in _hf.moe.experts_modules(model):
        if not config.matches(name):
            continue
        why = QuantExperts.supports(mod, config)
        if why:
            skipped[name] = why
        else:
            chosen.append(name)
    return chosen, skipped


def select_modules(model: nn.Module, config: QuantConfig, *, skip_quantized: bool = False
                   ) -> tuple[list[str], dict[str, str]]:
    """:func:`select_linears` and :func:`select_experts` together: every module ``config`` quantizes, in model
    order, and the skipped ones with reasons. The one selector of quantize, quantize-on-load, the estimator's
    per-module recipes and the budget search."""
    lin, skipped = select_linears(model, config, skip_quantized=skip_quantized)
    ex, ex_skipped = select_experts(model, config)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(lin + ex, key=order.__getitem__), {**skipped, **ex_skipped}


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig | None = None, *, progress: Progress | None = None) -> QuantResult:
    """Quantize ``model``'s Linear layers in place with ``config`` (default: ``QuantConfig()`` = w8a8).

    Returns a :class:`QuantResult`; skipped layers are also logged. Raises ``ValueError`` when a selected
    layer is already quantized, when no layer can be quantized, or when a weight holds NaN/Inf. A partly
    quantized model can be quantized again with another config on its remaining float layers (other
    ``include``/``exclude`` patterns); the checkpoint records and rebuilds both.
    ``scheme="static"`` needs calibrated activation ranges: use :class:`StaticQuantizer`.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if config.scheme == "static":
        raise ValueError("scheme 'static' needs calibration: use StaticQuantizer(...).quantize(model)")
    return _apply(model, config, progress=progress)


def _apply(model: nn.Module, config: QuantConfig, *, progress: Progress | None = None,
           act_scales: dict[str, float] | None = None) -> QuantResult:
    chosen, skipped = select_modules(model, config)
    for name, why in skipped.items():
        log.warning("not quantizing %s: %s", name, why)
    if not chosen:
        raise ValueError(f"no Linear layer can be quantized with {config.scheme} "
                         f"(include={list(config.include)}, exclude={list(config.exclude)}); skipped: {skipped}")
    result = QuantResult(config, chosen, skipped, bytes_before=model_bytes(model))
    # Check every weight first so a NaN never leaves the model half-quantized.
    check_weights({name: model.get_submodule(name) for name in chosen}, "cannot quantize")
    for i, name in enumerate(chosen):
        new = new_quantized(model.get_submodule(name), config)
        if act_scales is not None:
            new.act_scale.data.fill_(act_scales[name])
        set_module(model, name, new)
        if progress:
            progress(name, i + 1, len(chosen))
    result.bytes_after = model_bytes(model)
    result.full_precision = full_precision(model, config, skipped)
    log_full_precision(result.full_precision)
    if hasattr(model, "config"):
        hub.record_transform(model, TRANSFORM, {"config": config.to_dict(), "modules": chosen})
    model.quant_result = result
    hub.plugins.model_ready(model)  # model.generate(cache_implementation="static") -> the compiled decode
    log.info("quantized %d Linear layers to %s (%d skipped): %.1f MiB -> %.1f MiB", len(chosen), config.scheme,
             len(skipped), result.bytes_before / 2**20, result.bytes_after / 2**20)
    return result


class DynamicQuantizer:
    """Short forms: ``DynamicQuantizer.quantize(model, bits=8)`` (w8a8) or ``bits=4`` (w4, group 128).

    On an FP8 GPU (compute capability >= 8.9) ``bits=8`` times the int8 (``torch._int_mm``) and the
    e4m3 (``torch._scaled_mm``) GEMMs once and keeps the faster; on the CPU it is int8.
    """

    @staticmethod
    def quantize(model: nn.Module, bits: int = 8, *, scheme: str | None = None, group_size: int | None = None,
                 include=("*",), exclude=("lm_head",), progress: Progress | None = None) -> nn.Module:
        """Quantize in place and return ``model``; the :class:`QuantResult` is ``model.quant_result``."""
        if isinstance(bits, bool) or bits not in (4, 8):
            raise ValueError(f"bits={bits!r} is not supported; accepted: 8 (w8a8) or 4 (w4, group 128)")
        if scheme is None:
            scheme = "w4" if bits == 4 else _pick_w8a8(model_device(model))
        elif QuantConfig(scheme=scheme).bits != bits:
            raise ValueError(f"scheme {scheme!r} is not a {bits}-bit scheme")
        cfg = QuantConfig(scheme=scheme, group_size=group_size, include=tuple(include), exclude=tuple(exclude))
        quantize(model, cfg, progress=progress)
        return model


def _pick_w8a8(device: torch.device) -> str:
    return fastest_w8a8(device) if device.type == "cuda" else "w8a8"


@hub.register_rebuilder(TRANSFORM)
def rebuild(model: nn.Module, spec: dict) -> None:
    """Replace the recorded Linear layers of an empty (meta-device) model by empty quantized ones."""
    config = QuantConfig.from_dict(spec["config"])
    for name in spec["modules"]:
        mod = model.get_submodule(name)
        if _hf.as_linear(mod) is None and not _hf.moe.is_experts(mod):
            raise ValueError(f"checkpoint records quantized module {name!r} but the model has a {type(mod).__name__} there")
        set_module(model, name, empty_quantized(mod, config, device="meta"))
