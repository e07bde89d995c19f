"""Quantize-on-load: each Linear is quantized as soon as its weight has been read; only the packed result stays.

:class:`QuantizeOnLoad` is the :class:`~openautoglm.hub.lazy.LoadHook` behind
``from_pretrained(path, quantization=...)`` and :func:`quantize_pretrained` (``openautoglm compress``). It
swaps the selected ``nn.Linear`` s of the meta-device model for empty quantized modules before anything is
read (so the final layout is known up front), takes their float weights as they stream in, and packs them
with the same ``from_linear`` as the in-memory path, on the target device: the packed tensors are identical
to ``DynamicQuantizer.quantize(from_pretrained(path))``. Peak memory is the quantized model plus one weight
(big weights are packed in row blocks, each output row depending on its own weights only).

``scheme="static"`` calibrates sequentially, as llm-compressor's pipeline does: the inputs of the first
decoder layer are captured on the calibration text, then layer ``i`` is read, run on them in full precision
with observers on its Linears, quantized with the observed ranges, and its output feeds layer ``i + 1`` --
the same activations the in-memory :class:`StaticQuantizer` sees, one layer in memory instead of all.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from .. import _hf, hub
from .._util.modules import model_bytes, set_module
from ..errors import CheckpointError
from ..hub import has_tokenizer, load_tokenizer
from ..hub.lazy import OUTER, LoadHook, assign, layers_prefix, unit_of
from .api import TRANSFORM, QuantResult, _pick_w8a8, select_modules
from .config import QuantConfig
from .experts import QuantExperts
from .linear import LINEAR_CLASSES, QuantLinear
from .report import full_precision, log_full_precision
from .static import Observer, calibration_batches

log = logging.getLogger(__name__)
CHUNK_ELEMENTS = 1 << 24  # weights larger than this are packed in row blocks (bounds the float32 temporaries)


def resolve_config(quantization: QuantConfig | None, bits: int | None, device: torch.device) -> QuantConfig:
    """``quantization`` itself, or the config of the short form ``bits`` (8: w8a8 / w8a8-fp8, 4: w4 g128)."""
    if quantization is not None and bits is not None:
        raise ValueError("pass either quantization=QuantConfig(...) or bits=8|4, not both")
    if quantization is not None:
        if not isinstance(quantization, QuantConfig):
            raise TypeError(f"quantization must be a QuantConfig, got {type(quantization).__name__}")
        return quantization
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported; accepted: 8 (w8a8) or 4 (w4, group 128)")
    return QuantConfig(scheme="w4" if bits == 4 else _pick_w8a8(torch.device(device)))


@torch.no_grad()
def quantize_linear(linear: nn.Linear, cls: type[QuantLinear], config: QuantConfig,
                    chunk_elements: int = CHUNK_ELEMENTS) -> QuantLinear:
    """``cls.from_linear(linear, config)``, computed in blocks of output rows for big weights (same result).

    Each block is quantized on its own and copied where :meth:`QuantLinear.tp_slices` says output rows
    ``[r0, r1)`` live in every stored tensor (the description tensor parallelism cuts by), so the float32
    temporaries of the quantizer cover one block, not the whole weight.
    """
    n, k = linear.out_features, linear.in_features
    new = cls.empty(linear, config, device=linear.weight.device)
    step = math.lcm(16, new.tp_granularity("out"))
    rows = max(step, chunk_elements // max(k, 1) // step * step)
    if n <= rows or n % step:
        return cls.from_linear(linear, config)
    w, b = linear.weight, linear.bias
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        new.fill_rows(r0, w[r0:r1], b[r0:r1] if b is not None else None)
    new._prepare_device()
    return new


class QuantizeOnLoad(LoadHook):
    """Quantize the selected Linears of a meta-device model while a checkpoint streams into it.

    Parameters
    ----------
    model : the empty model (meta device), recorded transforms already rebuilt.
    config : what to quantize and how.
    device : where the weights are materialized and quantized.
    batches : ``scheme="static"`` only: calibration token batches ``(1, seq)`` (see :func:`calibration_batches`).
    """

    def __init__(self, model: nn.Module, config: QuantConfig, device: torch.device,
                 batches: list[torch.Tensor] | None = None) -> None:
        self.config, self.device, self.cls = config, torch.device(device), LINEAR_CLASSES[config.scheme]
        chosen, skipped = select_modules(model, config)
        for name, why in skipped.items():
            log.warning("not quantizing %s: %s", name, why)
        if not chosen:
            raise ValueError(f"no Linear layer can be quantized with {config.scheme} "
                             f"(include={list(config.include)}, exclude={list(config.exclude)}); skipped: {skipped}")
        self.result = QuantResult(config, chosen, skipped, bytes_before=model_bytes(model))
        self.prefix = layers_prefix(model)
        self.static = config.scheme == "static"
        if self.static:
            if batches is None:
                raise ValueError("scheme 'static' needs calibration batches")
            if self.prefix is None:
                raise ValueError(f"static quantize-on-load runs decoder layers one by one; {type(model).__name__} has "
                                 "no layer list known to openautoglm -- load it whole and use StaticQuantizer")
            head = model.get_output_embeddings()
            outer = [n for n in chosen if unit_of(n, self.prefix) == OUTER and model.get_submodule(n) is not head]
            if outer:
                raise ValueError(f"static quantize-on-load calibrates decoder layers and the LM head only; also selected: "
                                 f"{outer[:3]} -- exclude them, or load the model whole and use StaticQuantizer")
        self.batches = batches
        self.floats: dict[str, nn.Linear] = {}  # module name -> its float Linear (meta until read)
        self.claimed: dict[str, str] = {}  # checkpoint tensor name -> module name
        self.done: set[str] = set()
        self.experts: dict[str, _ExpertsFill] = {}  # experts module name -> its quantization in progress
        for name in chosen:
            mod = model.get_submodule(name)
            for p, _ in mod.named_parameters(recurse=False):
                self.claimed[f"{name}.{p}"] = name
            if _hf.moe.is_experts(mod):
                self.experts[name] = _ExpertsFill(mod, config, self.device)
                set_module(model, name, QuantExperts.empty(mod, config, device="meta"))
                continue
            self.floats[name] = mod
            set_module(model, name, self.cls.empty(_hf.as_linear(mod), config, device="meta"))  # Conv1D too
        self.inputs: list[tuple[tuple, dict]] = []
        self.hidden: list[torch.Tensor] = []

    @classmethod
    def for_model(cls, model: nn.Module, quantization: QuantConfig | None, bits: int | None, *, device,
                  source: Path | None = None, tokenizer=None, calib_text: str | None = None) -> "QuantizeOnLoad":
        """The hook for ``quantization`` / ``bits``; static calibration uses ``tokenizer`` (default: the one in
        ``source``) on ``calib_text`` (default: the bundled held-out text)."""
        config = resolve_config(quantization, bits, device)
        batches = None
        if config.scheme == "static":
            if tokenizer is None:
                if source is None or not has_tokenizer(Path(source)):
                    raise ValueError(f"static quantization calibrates on text and needs the model's tokenizer, but "
                                     f"{source} has none; pass tokenizer=..., or use w8a8, w8a8-fp8, w8 or w4")
                tokenizer = load_tokenizer(source)
            batches = calibration_batches(tokenizer, calib_text)
        return cls(model, config, device, batches)

    # -- LoadHook
    def claims(self, name: str) -> bool:
        return name in self.claimed

    def needs(self) -> list[str]:
        return list(self.claimed)

    def provides(self, name: str) -> bool:
        mod = name.rpartition(".")[0]
        return mod in self.floats or mod.rpartition(".")[0] in self.experts

    def take_piece(self, model: nn.Module, piece, tensor: torch.Tensor) -> None:
        mod = self.claimed[piece.target]
        fill = self.experts[mod]
        fill.take(piece.target.rpartition(".")[2], tensor, piece.expert, piece.offset)
        self._experts_done(model, mod)

    def take(self, model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        mod = self.claimed[name]
        if mod in self.experts:
            self.experts[mod].take(name.rpartition(".")[2], tensor)
            self._experts_done(model, mod)
            return
        lin = self.floats[mod]
        assign(lin, name.rpartition(".")[2], tensor, self.device)
        if not self.static and not any(p.is_meta for p in lin.parameters()):
            self._quantize(model, mod)

    def unit_loaded(self, model: nn.Module, unit: int) -> None:
        if not self.static:
            return
        if unit == OUTER:
            self.inputs = [_hf.decoder_layer_inputs(model, ids.to(self.device)) for ids in self.batches]
            self.hidden = [args[0] for args, _ in self.inputs]
            return
        layer = _hf.decoder_layers(model)[unit]
        names = [n for n in self.floats if unit_of(n, self.prefix) == unit]
        for n in names:
            set_module(model, n, self.floats[n])
        with _observing(model, names, self.config) as observers:
            self.hidden = [_hf.run_decoder_layer(layer, h, args, kw) for h, (args, kw) in zip(self.hidden, self.inputs)]
        for n in names:
            self._quantize(model, n, observers[n].scale())

    def finish(self, model: nn.Module) -> None:
        if self.static:
            left = [n for n in self.floats if n not in self.done]  # the LM head
            if left:
                norm = _hf.final_norm(model)
                for n in left:
                    set_module(model, n, self.floats[n])
                with _observing(model, left, self.config) as observers:
                    for h in self.hidden:
                        model.get_output_embeddings()(norm(h))
                for n in left:
                    self._quantize(model, n, observers[n].scale())
            self.inputs, self.hidden = [], []
        missing = [n for n in list(self.floats) + list(self.experts) if n not in self.done]
        if missing:
            raise RuntimeError(f"quantize-on-load left {missing[:3]} unquantized (their weights never arrived)")
        self.result.bytes_after = model_bytes(model)
        self.result.full_precision = full_precision(model, self.config, self.result.skipped)
        log_full_precision(self.result.full_precision)
        hub.record_transform(model, TRANSFORM, {"config": self.config.to_dict(), "modules": self.result.quantized})
        model.quant_result = self.result
        log.info("quantized %d Linear layers to %s while loading (%d skipped): %.1f MiB -> %.1f MiB",
                 len(self.done), self.config.scheme, len(self.result.skipped), self.result.bytes_before / 2**20,
                 self.result.bytes_after / 2**20)

    def _experts_done(self, model: nn.Module, name: str) -> None:
        fill = self.experts[name]
        if fill.complete():
            set_module(model, name, fill.finish())
            self.done.add(name)

    def _quantize(self, model: nn.Module, name: str, act_scale: float | None = None) -> None:
        try:
            new = quantize_linear(_hf.as_linear(self.floats.pop(name)), self.cls, self.config)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name}: {e}") from None
        if act_scale is not None:
            new.act_scale.data.fill_(act_scale)
        set_module(model, name, new)
        self.done.add(name)


class _observing:
    """Observers on the inputs of Linears ``names`` of ``model`` while the block runs (hooks removed after)."""

    def __init__(self, model: nn.Module, names: list[str], config: QuantConfig) -> None:
        self.model, self.names, self.config = model, names, config

    def __enter__(self) -> dict[str, Observer]:
        self.observers = {n: Observer(self.config.observer, self.config.percentile) for n in self.names}
        self.handles = [self.model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, obs=obs: obs.update(args[0])) for n, obs in self.observers.items()]
        return self.observers

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class _ExpertsFill:
    """One experts module quantized as its tensors arrive: whole fused tensors (``gate_up_proj`` ...) or, from a
    checkpoint storing experts one by one, one expert's part at a time (:class:`openautoglm._hf.moe.Piece`). Each
    expert is quantized into place as it comes (:meth:`QuantExperts.fill_expert`), so only the packed experts and
    one float expert are ever held; biases are copied as they are."""

    def __init__(self, module: nn.Module, config: QuantConfig, device: torch.device) -> None:
        self.float, self.config, self.device = module, config, device
        self.layout = _hf.moe.layout_of(module)
        self.q: QuantExperts | None = None
        self.up = _hf.moe.up_name(module)
        self.left = {n: p.shape[0] * (p.shape[1] if not n.endswith("_bias") else 1)
                     for n, p in module.named_parameters(recurse=False)}  # rows still to come, per tensor

    def _target(self) -> QuantExperts:
        if self.q is None:
            self.q = QuantExperts.empty(self.float, self.config, device=self.device)
        return self.q

    def take(self, attr: str, tensor: torch.Tensor, expert: int | None = None, offset: int = 0) -> None:
        q = self._target()
        p = self.float._parameters[attr]
        which = "up" if attr.startswith(self.up) else "down"
        t = tensor.to(self.device).to(p.dtype)
        if attr.endswith("_bias"):
            if expert is not None:
                raise CheckpointError(f"per-expert bias pieces of {attr} are not supported")
            q.stack(which).bias.data.copy_(t.reshape(-1))
            self.left[attr] = 0
            return
        if expert is not None:  # one expert's rows, (rows, in) as the model stores its (out, in) weights
            if self.layout.is_transposed:
                raise CheckpointError(f"per-expert pieces of transposed experts ({attr}) are not supported")
            q.fill_expert(which, expert, t, offset=offset)
            self.left[attr] -= t.shape[0]
            return
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{attr} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        for e in range(t.shape[0]):
            q.fill_expert(which, e, t[e].t() if self.layout.is_transposed else t[e])
        self.left[attr] = 0

    def complete(self) -> bool:
        return all(v <= 0 for v in self.left.values())

    def finish(self) -> QuantExperts:
        q = self._target()
        q.gate_up._prepare_device()
        q.down._prepare_device()
        return q
