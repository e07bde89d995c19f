"""Atomic saving: safetensors only, written into a temporary sibling folder renamed into place."""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

from torch import nn

from .._atomic import atomic_directory
from ..errors import CheckpointError

log = logging.getLogger("openautoglm.hub")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def _attach(model: nn.Module, source: Path | None) -> None:
    """Bind the atomic ``save_pretrained`` and remember where tokenizer files can be copied from."""
    model._openautoglm_source = str(source) if source else None
    model.save_pretrained = functools.partial(save_pretrained, model)


def _looks_like_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() or not any(p.iterdir())


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """The resolved output folder; refuses an existing path that is not an empty or model folder."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or not _looks_like_model_dir(out)):
        raise ValueError(f"refusing to replace {out}: it exists and is not an (empty or model) folder")
    return out


def copy_tokenizer(folder: Path, *, tokenizer=None, source: str | os.PathLike | None = None) -> list[str]:
    """Save ``tokenizer`` into ``folder``, or copy the tokenizer files found in ``source``; returns their names."""
    if tokenizer is not None:
        return [Path(f).name for f in tokenizer.save_pretrained(folder)]
    copied = []
    for name in TOKENIZER_FILES:
        if source and (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, folder / name)
            copied.append(name)
    return copied


def write_config(model: nn.Module, folder: Path) -> None:
    """``config.json`` (with the transform log) and ``generation_config.json``, as ``save_pretrained`` writes them."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(folder)


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
    out = check_output_dir(out_dir)
    with atomic_directory(out) as tmp:
        kwargs.pop("safe_serialization", None)
        type(model).save_pretrained(model, tmp, max_shard_size=max_shard_size, **kwargs)
        copy_tokenizer(tmp, tokenizer=tokenizer, source=getattr(model, "_openautoglm_source", None))
        for f in tmp.glob("*.bin"):
            raise CheckpointError(f"refusing to publish pickle file {f.name}; only safetensors are written")
    log.info("saved %s", out)
    return out
