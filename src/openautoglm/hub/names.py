"""Model names -> local folders: shipped models, local Hugging Face folders and Hub ids (``org/name``).

Hub ids go through ``huggingface_hub.snapshot_download``: a model already in the Hugging Face cache is used
from there (the only thing that happens when ``HF_HUB_OFFLINE=1``); otherwise, on a machine that is online,
the files a model needs are downloaded into that cache -- config and ``*.json``, ``*.safetensors``,
tokenizer files; pickle weights only with ``allow_pickle=True``, Python files only with
``trust_remote_code=True``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .._util.atomic import recover
from ..errors import CheckpointError, ModelNotFoundError

log = logging.getLogger("openautoglm.hub")

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SHIPPED_MODELS: dict[str, Path] = {"open-autoglm-base": PACKAGE_DIR / "models" / "open-autoglm-base"}
# What a download fetches: never pickle weights or code unless the caller allowed them.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}")


def shipped_models() -> list[str]:
    return sorted(SHIPPED_MODELS)


def looks_like_hub_id(s: str) -> bool:
    """``org/name`` (not an existing path, no leading ``.``, ``/`` or ``~``)."""
    return bool(_REPO_ID.fullmatch(s)) and ".." not in s and not s.endswith((".", "-"))


def resolve_model_path(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, allow_pickle: bool = False,
                       trust_remote_code: bool = False) -> Path:
    """Map a shipped model name, a local folder or a Hub id to a folder that holds ``config.json``.

    Parameters
    ----------
    name_or_path : shipped name (see :func:`shipped_models`), local folder, or Hub id ``org/name``.
    revision : Hub branch, tag or commit (default ``main``); Hub ids only.
    cache_dir : Hugging Face cache folder (default: ``HF_HUB_CACHE`` / ``~/.cache/huggingface/hub``).
    allow_pickle, trust_remote_code : also fetch ``*.bin``/``*.pt`` weights, or ``*.py`` files, from the Hub.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a folder path, got {type(name_or_path).__name__}")
    s = os.fspath(name_or_path)
    if s in SHIPPED_MODELS:
        path = SHIPPED_MODELS[s]
        if not (path / "config.json").is_file():
            raise CheckpointError(f"shipped model {s!r} is missing from this installation ({path})")
        return path
    if not s or "\x00" in s:
        raise ModelNotFoundError(f"model name {s!r} is empty or holds a NUL character")
    try:
        path = Path(s).expanduser()
        recover(path)  # a save into this folder that was killed mid-swap: put the previous folder back
        is_dir, exists = path.is_dir(), path.exists()
    except (OSError, RuntimeError) as e:  # name too long, ~user without a home, unreadable parent
        raise ModelNotFoundError(f"cannot use model path {s[:80]!r}: {e.strerror if isinstance(e, OSError) else e}") \
            from None
    if is_dir:
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"folder {s!r} has no config.json; a model folder needs config.json and *.safetensors")
        return path
    if exists:
        raise ModelNotFoundError(f"{s!r} is a file, not a model folder; pass the folder that holds config.json")
    if looks_like_hub_id(s):
        return _from_hub(s, revision, cache_dir, allow_pickle, trust_remote_code)
    raise ModelNotFoundError(
        f"unknown model {s!r}: shipped models are {', '.join(shipped_models())}, or pass a local folder "
        "holding config.json and *.safetensors, or a Hugging Face Hub id such as 'org/name'"
    )


def _from_hub(repo_id: str, revision, cache_dir, allow_pickle: bool, trust_remote_code: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = HUB_PATTERNS + (["*.bin", "*.pt", "*.pth"] if allow_pickle else []) + (["*.py"] if trust_remote_code else [])
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelNotFoundError(f"Hub model {where} is gated: accept its licence on huggingface.co and log in "
                                 "(`hf auth login`), then retry") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"unknown model {where}: it is not a shipped name ({', '.join(shipped_models())}), "
                                 "not a local folder, and not a Hub repository (or it is private: log in first)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"Hub model {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set, so it was not downloaded" if constants.HF_HUB_OFFLINE
               else "it could not be downloaded (no connection to the Hub?)")
        cache = cache_dir or constants.HF_HUB_CACHE
        raise ModelNotFoundError(
            f"unknown model {where}: not a shipped name ({', '.join(shipped_models())}) or a local folder, and not "
            f"in the Hugging Face cache {cache}; {why}") from None
    except (OSError, ValueError) as e:  # network errors, a malformed id
        raise ModelNotFoundError(f"cannot fetch Hub model {where}: {str(e).splitlines()[0]}") from None
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"Hub model {where} has no config.json (cached in {folder}); it is not a transformers model")
    log.info("Hub model %s -> %s", repo_id, folder)
    return folder
