"""Training checkpoints: safetensors files written into a temporary folder and renamed into place.

Layout of ``out_dir/checkpoint/``::

    model.safetensors       the model's parameters and buffers (shared tensors stored once)
    optimizer.safetensors   every optimizer state tensor, keys ``state.<param index>.<name>``
    trainer.json            step, losses, evaluations, config, optimizer scalars/param groups, GradScaler state

The folder is replaced with two renames, so an interruption leaves either the previous or the new
checkpoint (a stray ``.checkpoint.old-*`` folder is picked up if the crash fell between the renames).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_directory

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
    d = out / CKPT
    if (d / "trainer.json").is_file():
        return d
    olds = sorted(out.glob(f".{CKPT}.old-*"), key=lambda p: p.stat().st_mtime)
    return olds[-1] if olds and (olds[-1] / "trainer.json").is_file() else None


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
        doc = {**trainer, "optimizer": meta, "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        (tmp / "trainer.json").write_text(json.dumps(doc, indent=1))
    return out / CKPT


def load_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, scaler) -> dict[str, Any]:
    """Restore model, optimizer and scaler from ``out/checkpoint``; returns the trainer dict (step, losses, ...)."""
    from safetensors.torch import load_file, load_model

    d = _ckpt_dir(Path(out))
    if d is None:
        raise FileNotFoundError(f"no training checkpoint in {out}")
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(d / "model.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"checkpoint {d} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    doc = json.loads((d / "trainer.json").read_text())
    opt.load_state_dict(_unflatten_optimizer(load_file(str(d / "optimizer.safetensors")), doc["optimizer"]))
    if doc.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(doc["scaler"])
    return doc
