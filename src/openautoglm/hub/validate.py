"""Checkpoint validation: safetensors headers and sizes, shard index files (no tensor data is read).

:func:`validate_safetensors` checks one file; :func:`checkpoint_tensors` checks every weight file of a folder
and its shard index; :func:`check_against_model` compares those headers with the (meta-device) model the
config builds. All three read only headers, so they are cheap enough for ``openautoglm info``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._hf.moe import assembled, key_plan
from ..errors import CheckpointError

MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header
# element sizes (bytes) of the safetensors dtype names
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _check_entry(name: str, v: Any) -> int:
    """Validate one header entry and return its end offset."""
    if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
        raise ValueError(f"tensor {name!r} has no dtype/shape/data_offsets")
    dtype, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs) and 0 <= offs[0] <= offs[1]):
        raise ValueError(f"tensor {name!r} has invalid data_offsets {offs!r}")
    if offs[1] - offs[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ValueError(f"tensor {name!r} ({dtype}, shape {shape}) does not fill its data_offsets {offs}")
    return offs[1]


def validate_safetensors(path: Path) -> dict[str, Any]:
    """Check a safetensors file's header and size without reading its data; return the header.

    Checked: the 8-byte header length (within the file and the 100 MB limit), a JSON object header, each
    tensor's dtype, shape and offsets (the byte span matches ``dtype x shape``, the spans tile the data without
    overlap or gap) and the file size (equal to header + data: a truncated or padded file fails); something that
    is not a regular file (a FIFO would block the reader) is refused before it is opened. Raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    try:
        if not path.is_file():  # a folder, a FIFO (opening it would block forever), a device, a dangling link
            raise ValueError("not a regular file")
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER:
                raise ValueError(f"header length {n} exceeds the file size {size}"
                                 if n > size - 8 else f"header length {n} exceeds the {MAX_HEADER}-byte limit")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        spans = sorted((v["data_offsets"][0], stop, k) for k, v in header.items() if k != "__metadata__"
                       for stop in (_check_entry(k, v),))
        end = 0
        for begin, stop, k in spans:  # the tensors tile the data section: no overlap, no gap
            if begin != end:
                raise ValueError(f"tensor {k!r} starts at data byte {begin}, expected {end} (overlapping or "
                                 "unaccounted bytes)")
            end = stop
        if 8 + n + end != size:
            raise ValueError(f"expected {8 + n + end} bytes, found {size} (truncated?)")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from None
    return header


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(_read_index(index).values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"corrupt index file {index}: {e}") from None
        bad = [n for n in names if Path(n).name != n]
        if bad:
            raise CheckpointError(f"{index} names shards outside its folder: {', '.join(bad[:3])}")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        files = [path / n for n in names]
    return files


def _read_index(index: Path) -> dict[str, str]:
    wm = json.loads(index.read_text())["weight_map"]
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ValueError("weight_map must map tensor names to shard file names")
    return wm


@dataclass
class CheckpointTensors:
    """What a folder's safetensors headers say: tensor name -> (dtype, shape), file of each, bytes on disk."""

    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0
    n_files: int = 0


def checkpoint_tensors(path: Path) -> CheckpointTensors:
    """Validate every safetensors file of folder ``path`` (and its shard index) from the headers alone.

    Raises :class:`CheckpointError` naming the file for a truncated or corrupt shard, a tensor stored in two
    shards, or an index that lists a tensor its shard does not hold.
    """
    path = Path(path)
    out = CheckpointTensors()
    for f in weight_files(path):
        header = validate_safetensors(f)
        out.n_files += 1
        out.nbytes += f.stat().st_size
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if k in out.files:
                raise CheckpointError(f"tensor {k!r} is stored twice: in {out.files[k]} and {f.name} ({path})")
            out.tensors[k] = (v["dtype"], tuple(v["shape"]))
            out.files[k] = f.name
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wrong = [(k, s) for k, s in _read_index(index).items() if out.files.get(k) != s]
        if wrong:
            k, s = wrong[0]
            where = f"it is in {out.files[k]}" if k in out.files else "no shard holds it"
            raise CheckpointError(f"{index} says tensor {k!r} is in {s}, but {where} ({len(wrong)} such entries)")
    return out


def check_against_model(found: CheckpointTensors, model, path: Path) -> None:
    """Raise :class:`CheckpointError` when the headers lack a tensor ``model`` needs, or store one with
    another shape or kind (integer codes vs floating point). ``model`` may live on the meta device."""
    missing, wrong = [], []
    plan = key_plan(model, found.tensors, lambda k: found.tensors[k][1])  # per-expert tensors of MoE checkpoints
    tensors = {plan[k].target if k in plan else k: v for k, v in found.tensors.items()}
    files = {plan[k].target if k in plan else k: v for k, v in found.files.items()}
    for target, (shape, problems) in assembled(plan, lambda k: found.tensors[k][1]).items():
        if problems:
            raise CheckpointError(f"{path}: per-expert tensors of {target} do not assemble: {'; '.join(problems[:3])}")
        first = next(k for k, p in plan.items() if p.target == target)
        tensors[target] = (found.tensors[first][0], shape)
    for name, p in model.named_parameters():  # tied parameters once, under their first name
        if name not in tensors:
            missing.append(name)
            continue
        dtype, shape = tensors[name]
        stored_float = dtype.startswith(("F", "BF"))
        if shape != tuple(p.shape) or stored_float != p.is_floating_point():
            wrong.append(f"{name} is {dtype}{list(shape)} in {files[name]}, the model needs "
                         f"{str(p.dtype).replace('torch.', '')}{list(p.shape)}")
    if missing:
        raise CheckpointError(f"{path} lacks tensors the model needs: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if wrong:
        raise CheckpointError(f"{path} does not match its config.json: {wrong[0]}"
                              + (f" ({len(wrong)} such tensors)" if len(wrong) > 1 else ""))
