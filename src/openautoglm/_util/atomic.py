"""Atomic writes: build a folder (or file) under a temporary name, then swap it into place.

An interrupted write (exception, KeyboardInterrupt, a killed process, a full disk) leaves any previous
folder intact under its own name and no half-written one there. The swap of an existing folder is one
``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere (or where the file system refuses it) two renames, and a
writer killed between them leaves the old folder as ``.NAME.old-PID-*``, which :func:`recover` renames back.
Temporary folders carry the writer's process id, so the next writer (or loader) removes those of writers
that died; nothing can clean up after ``SIGKILL`` before that.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import DiskFullError

log = logging.getLogger(__name__)

_NAME_KEEP = 80  # characters of the final name kept in temporary names (file names are at most 255 bytes)


def _tag(final: Path, kind: str) -> str:
    return f".{final.name[:_NAME_KEEP]}.{kind}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _dead_writer(p: Path, tag: str) -> bool:
    """``p`` is named ``tag + PID-...`` and that process is gone."""
    pid = p.name[len(tag):].split("-", 1)[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def recover(final: str | os.PathLike) -> None:
    """Undo what a killed writer of ``final`` left: put back an old folder it had renamed aside (when
    ``final`` is missing), then delete its temporary and backup folders."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return
    old_tag, tmp_tag = _tag(final, "old"), _tag(final, "tmp")
    olds = sorted((p for p in parent.glob(old_tag + "*") if _dead_writer(p, old_tag)), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        log.warning("restoring %s from %s (a save into it was interrupted)", final, olds[-1].name)
        os.rename(olds.pop(), final)
    for p in olds + [p for p in parent.glob(tmp_tag + "*") if _dead_writer(p, tmp_tag)]:
        log.info("removing %s left by an interrupted save", p)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it replaces ``final``.

    At every moment either the old or the new complete folder exists under ``final`` (or, on file systems
    without an atomic exchange, under ``.NAME.old-PID-*`` for the instant between two renames).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tag(final, 'tmp')}{os.getpid()}-", dir=final.parent))
    backup = None
    try:
        yield tmp
        if final.exists() and _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # it now holds the old folder
        elif final.exists():
            backup = final.parent / f"{_tag(final, 'old')}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, backup)
            os.rename(tmp, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as e:
        if backup is not None and backup.exists() and not final.exists():
            os.rename(backup, final)  # interrupted between the two renames: put the old folder back
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk_full(e, final)
        raise


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _raise_disk_full(e: BaseException, final: Path) -> None:
    """Turn "no space left" (or over quota, or over the file-size limit) into a :class:`DiskFullError` that says
    what happened to ``final``."""
    if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in _DISK_FULL:
        where = f" ({e.filename})" if e.filename else ""
        raise DiskFullError(e.errno, f"{os.strerror(e.errno)} while writing {final}{where}; "
                            f"{'the previous ' + final.name + ' is unchanged' if final.exists() else 'nothing was written'}"
                            " and the partial files were removed -- free space (or raise the limit) and retry",
                            str(final)) from e


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``final`` for writing; on success it is flushed, synced and renamed over
    ``final``, so readers see the old file or the new one, never a partial one."""
    final = Path(final)
    fd, name = tempfile.mkstemp(prefix=f"{_tag(final, 'tmp')}{os.getpid()}-", dir=final.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(name)
        _raise_disk_full(e, final)
        raise
