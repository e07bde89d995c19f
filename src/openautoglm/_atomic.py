"""Atomic directory writes: build a folder under a temporary name, then rename it into place.

An interrupted write (exception, KeyboardInterrupt, killed process) leaves any previous folder intact and
no half-written one under the final name; the temporary folder is removed on error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it replaces ``final`` by renames.

    The old ``final`` (if any) is renamed aside first and deleted only after the new folder is in place,
    so at every moment either the old or the new complete folder exists under a known name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            backup = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, backup)
            os.rename(tmp, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
