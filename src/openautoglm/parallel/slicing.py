"""What one rank keeps of each tensor, and how it is cut: in memory, on the meta device, or from safetensors.

A *cut* keeps features ``[start, stop)`` of a module along ``"out"`` (rows of the weight: column-parallel
layers, vocabulary rows of an embedding) or ``"in"`` (columns: row-parallel layers). :func:`module_slices`
turns a cut into one :class:`Slice` per stored tensor -- plain ``nn.Linear`` / ``nn.Embedding`` here, every
other module through its own ``tp_slices`` method (quantized and low-rank layers implement it), so a packed
layout is cut consistently (codes, scales, zero points) and never dequantized. The same slices drive
:func:`narrow_module` (in place, real or meta tensors) and :func:`read_slice` (a rank reads only its part of a
safetensors tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

DIMS = ("out", "in")


@dataclass(frozen=True)
class Slice:
    """Keep ``start:stop`` along ``axis`` of a tensor."""

    axis: int
    start: int
    stop: int

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        s = list(full)
        s[self.axis] = self.stop - self.start
        return tuple(s)

    def covers(self, full: tuple[int, ...]) -> bool:
        return self.start == 0 and self.stop == full[self.axis]


class _Drop:
    """Marker: this rank does not hold the tensor (a row-parallel bias lives on rank 0 only)."""

    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()
TensorCut = Union[Slice, None, _Drop]  # None: the whole tensor


def granularity(mod: nn.Module, dim: str) -> int:
    """Cuts of ``mod`` along ``dim`` must fall on multiples of this many features."""
    if type(mod) in (nn.Linear, nn.Embedding):
        return 1
    fn = getattr(mod, "tp_granularity", None)
    if fn is None:
        raise TypeError(f"{type(mod).__name__} cannot be split for tensor parallelism: it has no tp_slices / "
                        "tp_granularity methods (supported: nn.Linear, nn.Embedding, openautoglm's quantized and "
                        "low-rank layers)")
    return int(fn(dim))


def module_slices(mod: nn.Module, dim: str, start: int, stop: int) -> dict[str, TensorCut]:
    """``{tensor name inside mod: Slice or None}`` for a rank holding features ``[start, stop)`` of ``dim``."""
    if dim not in DIMS:
        raise ValueError(f"dim={dim!r}; accepted: {', '.join(DIMS)}")
    if type(mod) is nn.Embedding:
        if dim != "out":
            raise ValueError("an embedding is cut by vocabulary rows only (dim='out')")
        return {"weight": Slice(0, start, stop)}
    if type(mod) is nn.Linear:
        axis = 0 if dim == "out" else 1
        out: dict[str, TensorCut] = {"weight": Slice(axis, start, stop)}
        if mod.bias is not None:
            out["bias"] = Slice(0, start, stop) if dim == "out" else None
        return out
    granularity(mod, dim)  # raises the unsupported-module TypeError
    return {k: None if v is None else Slice(*v) for k, v in mod.tp_slices(dim, start, stop).items()}


def _owner(mod: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (mod.get_submodule(path) if path else mod), attr


def _cut_tensor(t: torch.Tensor, sl: Slice) -> torch.Tensor:
    if t.is_meta:
        return torch.empty(sl.shape(tuple(t.shape)), dtype=t.dtype, device="meta")
    # clone: a narrowed view would keep the whole tensor's storage alive on this rank
    return t.narrow(sl.axis, sl.start, sl.stop - sl.start).clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def narrow_module(mod: nn.Module, slices: dict[str, TensorCut], dim: str, start: int, stop: int) -> None:
    """Cut ``mod``'s tensors in place as ``slices`` say and update its feature counts."""
    for name, sl in slices.items():
        owner, attr = _owner(mod, name)
        if sl is DROP:
            if attr in owner._parameters:
                owner._parameters[attr] = None
            else:
                owner._buffers[attr] = None
            continue
        t = getattr(owner, attr)
        if sl is None or sl.covers(tuple(t.shape)):
            continue
        new = _cut_tensor(t, sl)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            owner._buffers[attr] = new
    n = stop - start
    if type(mod) is nn.Embedding:
        mod.num_embeddings = n
    elif dim == "out" and hasattr(mod, "out_features"):
        mod.out_features = n
    elif dim == "in" and hasattr(mod, "in_features"):
        mod.in_features = n
    for sub in mod.modules():  # nested Linears (low-rank factors) report their new shapes too
        if type(sub) is nn.Linear and sub is not mod:
            sub.out_features, sub.in_features = sub.weight.shape
    prepare = getattr(mod, "_prepare_device", None)
    if callable(prepare):  # derived, device-specific layouts (tinygemm copies) follow the cut
        prepare()


def read_slice(handle, key: str, sl: TensorCut) -> torch.Tensor:
    """Read tensor ``key`` of an open safetensors file (``safe_open``), or only ``sl`` of it.

    ``get_slice`` reads just the bytes of the slice from the memory-mapped file: a rank never reads (nor holds)
    the other ranks' parts of a sharded tensor.
    """
    if sl is None:
        return handle.get_tensor(key)
    if sl is DROP:
        raise ValueError(f"tensor {key} is not held on this rank")
    view = handle.get_slice(key)
    if sl.covers(tuple(view.get_shape())):
        return handle.get_tensor(key)
    index = [slice(None)] * len(view.get_shape())
    index[sl.axis] = slice(sl.start, sl.stop)
    return view[tuple(index)].contiguous()


def sliced_bytes(shape: tuple[int, ...], element_size: int, sl: TensorCut) -> int:
    """Bytes a rank holds of a tensor of ``shape`` under ``sl``."""
    if sl is DROP:
        return 0
    n = 1
    for d in (shape if sl is None else sl.shape(shape)):
        n *= d
    return n * element_size
