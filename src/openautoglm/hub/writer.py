"""Streaming save: safetensors shards written tensor by tensor as the layers are finished.

The names, shapes and dtypes of every output tensor are known before any weight is read (the model is
built on the meta device in its final, compressed form), so :class:`StreamingWriter` lays out all shards and
writes their headers up front; each tensor is then written at its offset as soon as its layer is done and
freed right after. The host holds about one tensor, never a shard. Files go into the temporary folder of an
:func:`~openautoglm._util.atomic.atomic_directory`, renamed into place only when everything was written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .lazy import OUTER, layers_prefix, release, unit_of
from .reader import ST_DTYPES

_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def output_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` holds: its state dict, each shared (tied) tensor once, first name kept."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StreamingWriter:
    """Pre-planned safetensors shards of ``model`` (meta or real) under ``folder``; fill with :meth:`write_unit`.

    Parameters
    ----------
    folder : an existing (temporary) folder to write into.
    model : the model in its final form; only names, shapes and dtypes are read here.
    max_shard_size : bytes of tensor data per shard (a bigger single tensor gets a shard of its own).
    """

    def __init__(self, folder: Path, model: nn.Module, max_shard_size: int) -> None:
        self.folder, self.prefix = Path(folder), layers_prefix(model)
        tensors = output_tensors(model)
        for name, t in tensors.items():
            if t.dtype not in _ST_NAMES:
                raise CheckpointError(f"cannot save tensor {name!r} of dtype {t.dtype} as safetensors")
        order = sorted(tensors, key=lambda n: (unit_of(n, self.prefix) % (1 << 30), n))  # layers, then the rest
        groups: list[list[str]] = [[]]
        size = 0
        for name in order:
            nb = _nbytes(tensors[name])
            if groups[-1] and size + nb > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nb
        n = len(groups)
        self.files = [self.folder / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                      for i in range(n)]
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (shard index, file offset, nbytes)
        self.total = sum(_nbytes(t) for t in tensors.values())
        self._fds: list[int] = []
        for i, names in enumerate(groups):
            self._fds.append(self._layout(i, names, tensors))
        self.pending = set(self.where)

    def _layout(self, i: int, names: list[str], tensors: dict[str, torch.Tensor]) -> int:
        # Widest elements first, so every tensor starts at a multiple of its element size (no gaps allowed).
        names = sorted(names, key=lambda n: (-tensors[n].element_size(), n))
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            t = tensors[name]
            header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + _nbytes(t)]}
            offset += _nbytes(t)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        base = 8 + len(raw)
        for name in names:
            start, end = header[name]["data_offsets"]
            self.where[name] = (i, base + start, end - start)
        fd = os.open(self.files[i], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(fd, base + offset)
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor ``name`` (any device) at its place; each planned tensor exactly once."""
        if name not in self.pending:
            raise CheckpointError(f"tensor {name!r} is not part of this checkpoint or was written already")
        if tensor.is_meta:
            raise CheckpointError(f"tensor {name!r} was never loaded (still on the meta device)")
        i, offset, nbytes = self.where[name]
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise CheckpointError(f"tensor {name!r} has {data.nbytes} bytes, {nbytes} were planned")
        view = memoryview(data)
        while view.nbytes:
            view = view[os.pwrite(self._fds[i], view, offset + nbytes - view.nbytes):]
        self.pending.discard(name)

    def write_unit(self, model: nn.Module, unit: int) -> None:
        """Write every planned tensor of decoder layer ``unit`` (or of everything else, :data:`OUTER`), then free
        the layer."""
        for name, t in model.state_dict(keep_vars=True).items():
            if name in self.pending and unit_of(name, self.prefix) == unit:
                self.write(name, t)
        if unit != OUTER:
            release(model.get_submodule(f"{self.prefix}.{unit}"))

    def close(self) -> list[Path]:
        """Close the shards and write the index (several shards); every tensor must have been written."""
        self.abort()
        if self.pending:
            missing = sorted(self.pending)
            raise CheckpointError(f"{len(missing)} tensors were never written: {', '.join(missing[:5])}")
        if len(self.files) > 1:
            weight_map = {name: self.files[i].name for name, (i, _, _) in sorted(self.where.items())}
            (self.folder / INDEX_NAME).write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2) + "\n")
        return self.files

    def abort(self) -> None:
        """Close the shard files (the caller's atomic folder removes them)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
