"""Streaming a checkpoint into a model built on the meta device, one tensor (or one decoder layer) at a time.

:func:`stream_into` reads the tensors *unit* by unit -- first everything outside the decoder layers
(embeddings, final norm, head), then layer 0, 1, ... -- and materializes each one only when it is assigned,
directly on the target device and in the dtype the (meta) model expects. Two optional partners hook in:

* a :class:`LoadHook` claims tensors and reshapes modules as they arrive (quantize-on-load keeps only the
  packed result of each Linear; static quantization calibrates each layer once it is complete);
* a *sink* (:class:`~openautoglm.hub.writer.StreamingWriter`) writes each finished unit to disk and frees it,
  so a whole model never sits in memory at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
from collections.abc import Iterable

import torch
from torch import nn

from .. import _hf
from .._hf.moe import Piece, assembled, key_plan
from ..errors import CheckpointError
from .reader import CheckpointReader

log = logging.getLogger("openautoglm.hub")
OUTER = -1  # unit key of everything outside the decoder layers


class LoadHook:
    """Base class of the partners of :func:`stream_into` (every method is optional)."""

    def claims(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` goes to the hook (:meth:`take`) instead of the model."""
        return False

    def take(self, model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        """Receive a claimed tensor (on the CPU, the checkpoint's dtype)."""

    def unit_loaded(self, model: nn.Module, unit: int) -> None:
        """Every tensor of ``unit`` (a decoder layer index, or :data:`OUTER`) has been read."""

    def finish(self, model: nn.Module) -> None:
        """All tensors have been read (before the outer unit goes to the sink)."""

    def take_piece(self, model: nn.Module, piece: Piece, tensor: torch.Tensor) -> None:
        """Receive one expert's part of a claimed fused-experts tensor (``piece.target``), from a checkpoint that
        stores experts one by one (:func:`openautoglm._hf.moe.key_plan`)."""
        raise NotImplementedError(f"{type(self).__name__} does not take per-expert checkpoint tensors "
                                  f"({piece.target})")


def layers_prefix(model: nn.Module) -> str | None:
    """Module name of the decoder layer list (``"model.layers"``), or ``None`` for an unknown architecture."""
    try:
        layers = _hf.decoder_layers(model)
    except TypeError:
        return None
    return next((n for n, m in model.named_modules() if m is layers), None)


def unit_of(name: str, prefix: str | None) -> int:
    """Decoder layer index of tensor or module ``name``, or :data:`OUTER`."""
    if prefix and name.startswith(prefix + "."):
        head = name[len(prefix) + 1:].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return OUTER


def required_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters a checkpoint must provide: each shared (tied) tensor once, under its first name."""
    return dict(model.named_parameters())


def assign(model: nn.Module, name: str, value: torch.Tensor, device: torch.device, source: str = "", *,
           own: bool = False) -> None:
    """Put checkpoint tensor ``value`` into ``model`` as ``name``: moved to ``device`` first, then cast there to
    the dtype the model holds (floating tensors only; packed integer tensors must match exactly).

    A CPU tensor of the checkpoint's dtype stays a view of the memory-mapped file (no copy; its pages can be
    dropped and re-read by the kernel) unless ``own``: then it is copied, so the mapping can be released."""
    from accelerate.utils import set_module_tensor_to_device

    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters.get(attr, mod._buffers.get(attr))
    where = f" in {source}" if source else ""
    if tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(f"tensor {name!r}{where} has shape {tuple(value.shape)}, the model expects {tuple(old.shape)}")
    if value.dtype != old.dtype and not (value.is_floating_point() and old.is_floating_point()):
        raise CheckpointError(f"tensor {name!r}{where} has dtype {value.dtype}, the model expects {old.dtype}")
    if value.is_floating_point() and value.dtype.itemsize > 1 and not torch.isfinite(value).all():
        n = int((~torch.isfinite(value)).sum())
        raise CheckpointError(f"tensor {name!r}{where} holds {n} NaN/Inf values of {value.numel()}")
    moved = value.to(device).to(old.dtype)
    if own and moved.data_ptr() == value.data_ptr():
        moved = moved.clone()
    value = moved
    set_module_tensor_to_device(mod, attr, device, value=value, clear_cache=False)


def assign_piece(model: nn.Module, piece: Piece, value: torch.Tensor, device: torch.device, source: str = "") -> None:
    """Copy one expert's part of a fused-experts tensor (``piece``) into ``model``, allocating the fused tensor on
    ``device`` (uninitialised) when its first piece arrives."""
    from accelerate.utils import set_module_tensor_to_device

    mod_name, _, attr = piece.target.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters.get(attr, mod._buffers.get(attr))
    where = f" in {source}" if source else ""
    if old.is_meta:
        set_module_tensor_to_device(mod, attr, device, value=torch.empty(old.shape, dtype=old.dtype, device=device),
                                    clear_cache=False)
        old = mod._parameters.get(attr, mod._buffers.get(attr))
    dst = old.data[piece.expert]
    dst = dst.narrow(0, piece.offset, piece.rows) if piece.rows is not None else dst
    if tuple(dst.shape) != tuple(value.shape):
        raise CheckpointError(f"expert {piece.expert} of {piece.target}{where} has shape {tuple(value.shape)}, the "
                              f"model expects {tuple(dst.shape)}")
    if not value.is_floating_point():
        raise CheckpointError(f"expert {piece.expert} of {piece.target}{where} has dtype {value.dtype}; per-expert "
                              "tensors are read as floating point")
    if not torch.isfinite(value).all():
        raise CheckpointError(f"expert {piece.expert} of {piece.target}{where} holds NaN/Inf values")
    dst.copy_(value.to(device))


def release(module: nn.Module) -> None:
    """Free a module's tensors by putting them back on the meta device (shapes and dtypes are kept)."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta:
                m._buffers[k] = torch.empty_like(b, device="meta")


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):  # not glibc
        return None


def trim_host_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them after many mid-sized frees, e.g. the float32
    temporaries of quantizing on the CPU: about 200 MB of RSS on a 200 MB model without this)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _units(names: Iterable[str], prefix: str | None) -> list[tuple[int, list[str]]]:
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(unit_of(n, prefix), []).append(n)
    return sorted(groups.items())  # OUTER (-1) first, then the layers in order


def plan_keys(model: nn.Module, reader: CheckpointReader) -> dict[str, Piece]:
    """Checkpoint keys transformers would rename or merge for ``model`` (MoE checkpoints storing experts one by
    one), and where each goes; names already the model's are left out."""
    return key_plan(model, reader.keys(), reader.shape)


def provided(model: nn.Module, reader: CheckpointReader, plan: dict[str, Piece] | None = None) -> set[str]:
    """Model tensor names the checkpoint provides, per-expert pieces assembled (raises when they do not tile)."""
    plan = plan_keys(model, reader) if plan is None else plan
    names = {plan[k].target if k in plan else k for k in reader.keys()}
    for target, (shape, problems) in assembled(plan, reader.shape).items():
        if problems:
            raise CheckpointError(f"per-expert tensors of {target} do not assemble: {'; '.join(problems[:3])}")
    return names


def check_coverage(model: nn.Module, reader: CheckpointReader, hook: LoadHook | None, where) -> None:
    """Fail before reading anything when the checkpoint lacks tensors the model needs."""
    have = provided(model, reader)
    missing = [n for n in required_tensors(model) if n not in have and not getattr(hook, "provides", lambda n: False)(n)]
    missing += [n for n in getattr(hook, "needs", lambda: [])() if n not in have]
    if missing:
        raise CheckpointError(f"{where} lacks tensors the model needs: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))


def _unit_done(model: nn.Module, unit: int, hook: LoadHook | None, sink, device: torch.device) -> None:
    if hook is not None:
        hook.unit_loaded(model, unit)
    if sink is not None and unit != OUTER:
        sink.write_unit(model, unit)
    if device.type == "cpu":
        trim_host_heap()


@torch.no_grad()
def stream_into(model: nn.Module, reader: CheckpointReader, device: torch.device, *, hook: LoadHook | None = None,
                sink=None) -> list[str]:
    """Read every tensor of ``reader`` into the meta-device ``model`` on ``device``; returns the unused names.

    With a ``sink``, each finished decoder layer is handed to ``sink.write_unit(model, i)`` (which writes and
    frees it) and everything else to ``sink.write_unit(model, OUTER)`` at the end; tensors kept until then are
    copies, not views of the mapped shards (which would keep whole shards mapped).
    """
    prefix = layers_prefix(model)
    expected = set(dict(model.named_parameters(remove_duplicate=False))) | set(dict(model.named_buffers()))
    keys = plan_keys(model, reader)  # per-expert checkpoint tensors -> their place in the fused experts
    unused: list[str] = []
    plan: list[tuple[int, str, bool]] = []  # (unit, tensor name, claimed by the hook)
    order = {n: i for i, n in enumerate(reader.keys())}
    for unit, names in _units(order, prefix):
        for name in sorted(names, key=order.__getitem__):
            target = keys[name].target if name in keys else name
            claimed = hook is not None and hook.claims(target)
            if claimed or target in expected:
                plan.append((unit, name, claimed))
            else:
                unused.append(name)
    current = None
    with contextlib.closing(reader.stream([n for _, n, _ in plan], device)) as tensors:
        for (unit, name, claimed), (_, tensor) in zip(plan, tensors):
            if unit != current and current is not None:
                _unit_done(model, current, hook, sink, device)
            current = unit
            piece = keys.get(name)
            try:
                if piece is not None and piece.expert is not None:
                    if claimed:
                        hook.take_piece(model, piece, tensor)
                    else:
                        assign_piece(model, piece, tensor, device, reader.source(name))
                elif claimed:
                    hook.take(model, piece.target if piece else name, tensor)
                else:
                    assign(model, piece.target if piece else name, tensor, device, reader.source(name),
                           own=sink is not None)
            except CheckpointError as e:  # the hook sees module-relative names: say which tensor of which file
                if claimed:
                    raise CheckpointError(f"{reader.source(name)}: {name}: {e}") from None
                raise
            del tensor
    if current is not None:
        _unit_done(model, current, hook, sink, device)
    if hook is not None:
        hook.finish(model)
    if sink is not None:
        sink.write_unit(model, OUTER)
    reader.close()
    return unused
