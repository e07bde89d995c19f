"""Training checkpoints: safetensors files written into a temporary folder and renamed into place.

Layout of ``out_dir/checkpoint/``::

    model.safetensors       the model's parameters and buffers (shared tensors stored once)
    optimizer.safetensors   every optimizer state tensor, keys ``state.<param index>.<name>``
    rng.safetensors         the global CPU/CUDA random generator states (dropout continues exactly)
    trainer.json            step, losses, evaluations, config, optimizer scalars/param groups, GradScaler state

The folder is swapped in atomically (:mod:`._atomic`), so an interruption leaves either the previous or the new
checkpoint; a damaged one is refused with a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util.atomic import atomic_directory, recover
from ..errors import CheckpointError
from ..hub.validate import validate_safetensors

CKPT = "checkpoint"


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, kv in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


def _ckpt_dir(out: Path) -> Path | None:
    recover(out / CKPT)  # a save killed between its two renames: put the previous checkpoint back
    d = out / CKPT
    return d if (d / "trainer.json").is_file() else None


def has_checkpoint(out: Path) -> bool:
    return _ckpt_dir(Path(out)) is not None


def save_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, scaler, trainer: dict[str, Any]) -> Path:
    """Write model, optimizer and trainer state into ``out/checkpoint`` atomically; returns that folder."""
    from safetensors.torch import save_file, save_model

    out = Path(out)
    with atomic_directory(out / CKPT) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(opt.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        doc = {**trainer, "optimizer": meta, "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        (tmp / "trainer.json").write_text(json.dumps(doc, indent=1))
    return out / CKPT


def load_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, scaler) -> dict[str, Any]:
    """Restore model, optimizer and scaler from ``out/checkpoint``; returns the trainer dict (step, losses, ...).

    A damaged checkpoint (truncated file, bad JSON, tensors that do not fit) is a :class:`CheckpointError`
    naming the file, never a silent fresh start."""
    from safetensors.torch import load_file, load_model

    d = _ckpt_dir(Path(out))
    if d is None:
        raise FileNotFoundError(f"no training checkpoint in {out}")
    device = next(model.parameters()).device
    files = {n: d / n for n in ("model.safetensors", "optimizer.safetensors")}
    for f in files.values():
        validate_safetensors(f) if f.is_file() else _missing(f)
    try:
        doc = json.loads((d / "trainer.json").read_text())
        int(doc["step"]), doc["optimizer"]["scalars"], doc["optimizer"]["param_groups"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"training checkpoint file {d / 'trainer.json'} is unreadable: {e}") from None
    try:
        missing, unexpected = load_model(model, str(files["model.safetensors"]), strict=False, device=str(device))
        if missing or unexpected:
            raise CheckpointError(f"training checkpoint {files['model.safetensors']} does not match the model: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        opt.load_state_dict(_unflatten_optimizer(load_file(str(files["optimizer.safetensors"])), doc["optimizer"]))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors / optimizer state errors: name the checkpoint
        raise CheckpointError(f"cannot restore the training checkpoint in {d} (model.safetensors, "
                              f"optimizer.safetensors): {type(e).__name__}: {e}") from None
    if doc.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(doc["scaler"])
    if (d / "rng.safetensors").is_file():  # checkpoints written before it existed resume without it
        _set_rng_state(load_file(str(d / "rng.safetensors")))
    return doc


def _rng_state() -> dict[str, torch.Tensor]:
    """The global random generators (CPU, each CUDA device): dropout and sampling continue exactly on resume."""
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return st


def _set_rng_state(st: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(st["cpu"])
    cuda = [st[k] for k in sorted((k for k in st if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _missing(f: Path):
    raise CheckpointError(f"training checkpoint file {f} is missing")
