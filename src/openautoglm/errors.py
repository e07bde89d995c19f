"""Exceptions raised by openautoglm.

Every error a user can trigger is one of these (or a plain ``ValueError`` / ``TypeError`` from config
validation) with a one-line message naming the bad value and what is accepted. The CLI maps
``ValueError``/``TypeError`` to exit status 2 (bad usage) and everything else to 1 (failure).
"""

from __future__ import annotations

import errno


class OpenAutoGLMError(Exception):
    """Base class of openautoglm's own errors."""


class ModelNotFoundError(OpenAutoGLMError, ValueError):
    """An unknown model name, or a path that is not a model folder."""


class UnsupportedModelError(OpenAutoGLMError, ValueError):
    """A model (or architecture) that the requested feature cannot handle."""


class CheckpointError(OpenAutoGLMError, RuntimeError):
    """A checkpoint file that is truncated, corrupt, refused (pickle) or inconsistent with its config."""


class OutputExistsError(OpenAutoGLMError, FileExistsError, ValueError):
    """The output folder exists and replacing it was not asked for (``overwrite=True`` / ``--overwrite``).

    ``OutputExistsError(message, path)``: ``str()`` is the message alone (no ``[Errno 17]`` prefix); ``errno`` is
    ``EEXIST`` and ``filename`` the path, as for any ``FileExistsError``."""

    def __init__(self, message: str, path=None) -> None:
        super().__init__(errno.EEXIST, message, *([str(path)] if path is not None else []))

    def __str__(self) -> str:
        return str(self.strerror)


class DiskFullError(OpenAutoGLMError, OSError):
    """The disk (or a quota, or a file-size limit) ran out while writing; the previous output is unchanged."""


class OutOfMemoryError(OpenAutoGLMError, MemoryError):
    """Not enough (CPU) memory to load a model; the message says how much its tensors need."""
