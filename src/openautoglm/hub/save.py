"""Atomic saving: safetensors only, written into a temporary sibling folder renamed into place."""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

from torch import nn

from .._util.atomic import atomic_directory
from ..errors import CheckpointError, OutputExistsError

log = logging.getLogger("openautoglm.hub")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def _attach(model: nn.Module, source: Path | None) -> None:
    """Bind the atomic ``save_pretrained`` and remember where tokenizer files can be copied from."""
    model._openautoglm_source = str(source) if source else None
    model.save_pretrained = functools.partial(save_pretrained, model)


def _looks_like_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() or not any(p.iterdir())


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, what: str = "output folder") -> Path:
    """Validate an output folder before any work is done; returns it resolved.

    Refused (``ValueError`` naming the path): an empty or NUL-holding name, a symbolic link, a name longer
    than the file system allows, a path under a file, the working folder or one of its parents, a file-system root, an
    existing file or non-model folder; an existing model folder unless ``overwrite`` (``OutputExistsError``).
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path, got {type(out_dir).__name__}")
    raw = os.fspath(out_dir)
    if not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
        raise ValueError(f"{what} {raw!r} is not a usable folder name")
    if any(len(os.fsencode(part)) > 200 for part in Path(raw).parts):
        raise ValueError(f"{what} {raw[:60]!r}...: a folder name longer than 200 bytes is not supported")
    try:
        link = Path(raw).expanduser().is_symlink()
        out = Path(raw).expanduser().resolve()
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{what} {raw!r} cannot be resolved: {e}") from None
    if link:
        raise ValueError(f"{what} {raw!r} is a symbolic link; name the real folder (a link is not followed for "
                         "writing)")
    try:
        cwd = Path.cwd()
    except OSError:  # the working folder was deleted
        cwd = None
    if out == Path(out.anchor) or (cwd is not None and (out == cwd or out in cwd.parents)):
        raise ValueError(f"{what} {raw!r}: refusing to write the model over {out}: it is the working folder, one of "
                         "its parents or a file-system root; name a new folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot create {what} {raw!r} ({out}): {parent} is a file, not a folder")
    if out.exists():
        if not out.is_dir() or not _looks_like_model_dir(out):
            raise ValueError(f"refusing to replace {what} {out}: it exists and is not an (empty or model) folder")
        if not overwrite and any(out.iterdir()):
            hint = "--overwrite" if what.startswith("--") else "overwrite=True"
            raise OutputExistsError(f"{what} {out} exists and is not empty; pass {hint} to replace it", out)
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
    overwrite: bool = False,
    **kwargs,
) -> Path:
    """Save ``model`` as safetensors into ``out_dir`` atomically.

    Everything is written into a temporary sibling folder that is renamed into place at the end, so an
    interrupted save leaves any previous ``out_dir`` intact and no half-written folder. Tokenizer files
    are copied from the model's source folder (or saved from ``tokenizer``). An existing ``out_dir`` is
    replaced only with ``overwrite=True``, and only if it is empty or itself a model folder
    (:func:`check_output_dir`); otherwise ``OutputExistsError`` / ``ValueError`` before anything is written.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    with atomic_directory(out) as tmp:
        kwargs.pop("safe_serialization", None)
        type(model).save_pretrained(model, tmp, max_shard_size=max_shard_size, **kwargs)
        copy_tokenizer(tmp, tokenizer=tokenizer, source=getattr(model, "_openautoglm_source", None))
        for f in tmp.glob("*.bin"):
            raise CheckpointError(f"refusing to publish pickle file {f.name}; only safetensors are written")
    log.info("saved %s", out)
    return out
