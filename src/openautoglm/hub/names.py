"""Model names -> local folders: the shipped models and local Hugging Face folders."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SHIPPED_MODELS: dict[str, Path] = {"open-autoglm-base": PACKAGE_DIR / "models" / "open-autoglm-base"}


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
