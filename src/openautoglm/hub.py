"""Model names -> folders, loading and atomic saving.

``from_pretrained`` accepts a shipped model name (``open-autoglm-base``) or a local Hugging Face folder
(``config.json`` + safetensors, sharded or not). Compressed checkpoints record what was done to them in
``config.json`` under ``"openautoglm": {"version": 1, "transforms": [...]}``; each transform type has a
*rebuilder* registered with :func:`register_rebuilder` that reshapes the freshly built (empty, meta-device)
model -- swap in quantized modules, drop pruned heads -- before the saved tensors are assigned. So a
compressed model reloads without the user repeating the recipe and without materializing full-precision
weights.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _hf
from ._atomic import atomic_directory
from .errors import CheckpointError, ModelNotFoundError, UnsupportedModelError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_MODELS: dict[str, Path] = {"open-autoglm-base": PACKAGE_DIR / "models" / "open-autoglm-base"}
META_KEY = "openautoglm"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

Rebuilder = Callable[[nn.Module, dict], None]
_REBUILDERS: dict[str, Rebuilder] = {}


# ----------------------------------------------------------------------------- registry

def register_rebuilder(kind: str) -> Callable[[Rebuilder], Rebuilder]:
    """Register ``fn(model, spec)`` that re-applies the *structure* of transform ``kind`` to an empty model."""

    def deco(fn: Rebuilder) -> Rebuilder:
        _REBUILDERS[kind] = fn
        return fn

    return deco


def registered_transforms() -> list[str]:
    _import_plugins()
    return sorted(_REBUILDERS)


def record_transform(model: nn.Module, kind: str, spec: dict[str, Any]) -> None:
    """Append ``{"type": kind, **spec}`` to the model config's transform log (saved in config.json).

    A model that our loader did not build also gets the atomic :func:`save_pretrained` bound here, so every
    in-place verb that records a transform saves its result atomically."""
    meta = getattr(model.config, META_KEY, None) or {"version": FORMAT_VERSION, "transforms": []}
    meta = {"version": meta.get("version", FORMAT_VERSION), "transforms": list(meta.get("transforms", []))}
    meta["transforms"].append({"type": kind, **json.loads(json.dumps(spec))})
    setattr(model.config, META_KEY, meta)
    if not hasattr(model, "_openautoglm_source"):  # not loaded by us: bind the atomic save_pretrained too
        _attach(model, None)


def applied_transforms(model_or_config) -> list[dict]:
    cfg = getattr(model_or_config, "config", model_or_config)
    meta = getattr(cfg, META_KEY, None) or (cfg.get(META_KEY) if isinstance(cfg, dict) else None) or {}
    return list(meta.get("transforms", []))


def _import_plugins() -> None:
    # Each capability registers its rebuilder on import; import them lazily so `import openautoglm` stays light.
    import importlib

    for mod in ("openautoglm.quant", "openautoglm.prune"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # capability not present in this build
            if e.name != mod:
                raise


# ----------------------------------------------------------------------------- resolving names

def shipped_models() -> list[str]:
    return sorted(SHIPPED_MODELS)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Map a shipped model name or a local folder to a folder that holds ``config.json``."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a folder path, got {type(name_or_path).__name__}")
    s = os.fspath(name_or_path)
    if s in SHIPPED_MODELS:
        path = SHIPPED_MODELS[s]
        if not (path / "config.json").is_file():
            raise CheckpointError(f"shipped model {s!r} is missing from this installation ({path})")
        return path
    path = Path(s).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"folder {s!r} has no config.json; a model folder needs config.json and *.safetensors")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{s!r} is a file, not a model folder; pass the folder that holds config.json")
    hint = (
        "; models are not downloaded from a hub -- download it yourself and pass the local folder"
        if s.count("/") == 1 and not s.startswith((".", "/", "~"))
        else ""
    )
    raise ModelNotFoundError(
        f"unknown model {s!r}: shipped models are {', '.join(shipped_models())}, or pass a local folder "
        f"holding config.json and *.safetensors{hint}"
    )


# ----------------------------------------------------------------------------- checkpoint validation

def validate_safetensors(path: Path) -> dict[str, Any]:
    """Check a safetensors file's header and size without reading its data; return the header.

    Raises :class:`CheckpointError` naming the file when it is truncated or corrupt.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"expected {8 + n + end} bytes, found {size} (truncated?)")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from None
    return header


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"corrupt index file {index}: {e}") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        files = [path / n for n in names]
    return files


# ----------------------------------------------------------------------------- loading

def _load_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"config.json in {path} is not valid JSON: {e}") from None
    if "model_type" not in raw:
        raise UnsupportedModelError(f"config.json in {path} has no 'model_type'; it is not a transformers model config")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UnsupportedModelError(f"cannot read config.json in {path}: {str(e).splitlines()[0]}") from None
    if not _hf.is_causal_lm_config(config):
        archs = getattr(config, "architectures", None) or [config.model_type]
        raise UnsupportedModelError(
            f"{path} holds a {', '.join(archs)} model, not a causal language model; "
            "openautoglm works on *ForCausalLM architectures (Llama, Mistral, Qwen2/3, ...)"
        )
    return config


def _resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        d = getattr(config, "dtype", None) or torch.float32
        return getattr(torch, d) if isinstance(d, str) else d
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(names)}, auto")
        return names[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or a name, got {dtype!r}")
    return dtype


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


def _attach(model: nn.Module, source: Path | None) -> None:
    """Bind the atomic ``save_pretrained`` and remember where tokenizer files can be copied from."""
    model._openautoglm_source = str(source) if source else None
    model.save_pretrained = functools.partial(save_pretrained, model)


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


# ----------------------------------------------------------------------------- saving

def _looks_like_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() or not any(p.iterdir())


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: str | int = "2GB",
    tokenizer=None,
    **kwargs,
) -> Path:
    """Save ``model`` as safetensors into ``out_dir`` atomically.

    Everything is written into a temporary sibling folder that is renamed into place at the end, so an
    interrupted save leaves any previous ``out_dir`` intact and no half-written folder. Tokenizer files
    are copied from the model's source folder (or saved from ``tokenizer``). An existing ``out_dir`` is
    replaced only if it is empty or itself a model folder.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or not _looks_like_model_dir(out)):
        raise ValueError(f"refusing to replace {out}: it exists and is not an (empty or model) folder")
    with atomic_directory(out) as tmp:
        kwargs.pop("safe_serialization", None)
        type(model).save_pretrained(model, tmp, max_shard_size=max_shard_size, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            src = getattr(model, "_openautoglm_source", None)
            for name in TOKENIZER_FILES:
                if src and (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, tmp / name)
        for f in tmp.glob("*.bin"):
            raise CheckpointError(f"refusing to publish pickle file {f.name}; only safetensors are written")
    log.info("saved %s", out)
    return out


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
