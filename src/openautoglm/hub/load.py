"""Loading: a shipped name or local folder -> a transformers model, rebuilding recorded compression."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .. import _hf
from ..errors import CheckpointError, ModelNotFoundError
from .config import _load_config, _resolve_dtype
from .names import resolve_model_path
from .registry import _REBUILDERS, _import_plugins, applied_transforms
from .save import _attach
from .validate import validate_safetensors, weight_files

log = logging.getLogger("openautoglm.hub")

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def _read_state_dict(files: list[Path], device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f, device=str(device)))
        except Exception as e:  # safetensors raises its own error type
            raise CheckpointError(f"cannot read safetensors file {f}: {e}") from None
    return state


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    found = [n for n in PICKLE_FILES if (path / n).is_file()]
    if not found:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    if not allow_pickle:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(found)}); pickle files can run code when loaded, so "
            "they are refused -- convert to safetensors, or pass allow_pickle=True to load them with weights_only=True"
        )
    state: dict[str, torch.Tensor] = {}
    files = [path / n for n in found if not n.endswith(".json")]
    if (path / "pytorch_model.bin.index.json").is_file():
        idx = json.loads((path / "pytorch_model.bin.index.json").read_text())["weight_map"]
        files = [path / n for n in sorted(set(idx.values()))]
    for f in files:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise CheckpointError(f"cannot load {f} with weights_only=True: {str(e).splitlines()[0]}") from None
    return state


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> nn.Module:
    """Load a causal LM (shipped name or local folder), rebuilding any openautoglm compression it records.

    Parameters
    ----------
    name_or_path : a shipped model name (see :func:`shipped_models`) or a local folder.
    dtype : floating dtype of the non-quantized weights; default: the checkpoint's own.
    device : where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``); default CPU.
    trust_remote_code : allow custom modelling code shipped in the folder (off by default).
    allow_pickle : accept ``pytorch_model.bin`` (loaded with ``weights_only=True``) when no safetensors exist.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM as _HFAuto

    path = resolve_model_path(name_or_path)
    config = _load_config(path, trust_remote_code)
    torch_dtype = _resolve_dtype(dtype, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    files = weight_files(path)
    for f in files:
        validate_safetensors(f)
    state = _read_state_dict(files, "cpu") if files else _load_pickle(path, allow_pickle)

    transforms = applied_transforms(config)
    if transforms:
        _import_plugins()
        unknown = [t["type"] for t in transforms if t.get("type") not in _REBUILDERS]
        if unknown:
            raise CheckpointError(
                f"{path} records transforms {unknown} that this openautoglm does not know; known: {sorted(_REBUILDERS)}"
            )
    with init_empty_weights(include_buffers=False):
        model = _HFAuto.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    for t in transforms:
        _REBUILDERS[t["type"]](model, t)
    # Float tensors follow the requested dtype; integer tensors (packed weights) keep theirs.
    expected = model.state_dict()
    for k, v in list(state.items()):
        if k in expected and v.is_floating_point() and expected[k].is_floating_point():
            state[k] = v.to(expected[k].dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = sorted({n for n, p in model.named_parameters() if p.is_meta})
    if still_meta:
        raise CheckpointError(f"{path} lacks tensors the model needs: {', '.join(still_meta[:5])}"
                              + (" ..." if len(still_meta) > 5 else ""))
    if result.unexpected_keys:
        log.warning("ignored %d tensors not used by the model: %s", len(result.unexpected_keys), result.unexpected_keys[:5])
    _hf.rebuild_rotary_buffers(model, "cpu")
    model.eval()
    model = model.to(device)
    model.name_or_path = str(path)
    _attach(model, path)
    return model


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer saved with a shipped model or in a local folder."""
    from transformers import AutoTokenizer as _HFTok

    path = resolve_model_path(name_or_path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelNotFoundError(f"folder {path} has no tokenizer files (tokenizer.json)")
    return _HFTok.from_pretrained(path)


class AutoModelForCausalLM:
    """``openautoglm.AutoModelForCausalLM.from_pretrained(name_or_path, ...)``: see :func:`from_pretrained`."""

    from_pretrained = staticmethod(from_pretrained)

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoModelForCausalLM.from_pretrained(name_or_path)")


class AutoTokenizer:
    """``openautoglm.AutoTokenizer.from_pretrained(name_or_path)``: see :func:`load_tokenizer`."""

    from_pretrained = staticmethod(load_tokenizer)

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoTokenizer.from_pretrained(name_or_path)")


def empty_model(name_or_path: str | os.PathLike, *, dtype=None, trust_remote_code: bool = False) -> nn.Module:
    """The model of a folder built on the meta device, with its recorded transforms applied; no weights read.

    Parameter shapes and dtypes are exact (quantized and pruned layers included), so byte counts
    taken from it equal those of the loaded model.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM as _HFAuto

    path = resolve_model_path(name_or_path)
    config = _load_config(path, trust_remote_code)
    transforms = applied_transforms(config)
    _import_plugins()
    with init_empty_weights(include_buffers=True):
        model = _HFAuto.from_config(config, dtype=_resolve_dtype(dtype, config), trust_remote_code=trust_remote_code)
        for t in transforms:
            if t.get("type") not in _REBUILDERS:
                raise CheckpointError(f"{path} records transform {t.get('type')!r} that this openautoglm does not know")
            _REBUILDERS[t["type"]](model, t)
    return model
