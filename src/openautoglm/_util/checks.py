"""Argument checks shared by the config dataclasses: one line per field, one clear message per bad value.

Each check returns the value normalized (``number`` -> float, ``patterns`` -> tuple of str) or raises
``TypeError`` (wrong kind of value) / ``ValueError`` (right kind, out of range) naming the field, the value
and what is accepted. Booleans are never numbers here (``True`` is not a group size), NaN and infinities
are never in range, and strings are never numbers ("3" is not 3): a config read from JSON or a CLI gets the
same checks as one built in Python.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _range_text(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def integer(name: str, v: Any, *, min: int | None = None, max: int | None = None, optional: bool = False) -> int | None:
    """An integer (not a bool, not a float) in ``[min, max]``; ``None`` passes when ``optional``."""
    if v is None and optional:
        return None
    what = f"an integer {_range_text(min, max)}" if (min is not None or max is not None) else "an integer"
    if not _is_int(v):
        raise TypeError(f"{name}={v!r} must be {what}" + (" or None" if optional else ""))
    if (min is not None and v < min) or (max is not None and v > max):
        raise ValueError(f"{name}={v!r} must be {what}")
    return int(v)


def number(name: str, v: Any, *, min: float | None = None, max: float | None = None, min_open: bool = False,
           max_open: bool = False, optional: bool = False) -> float | None:
    """A finite real number (int or float, not a bool or a string) in the given range."""
    if v is None and optional:
        return None
    what = f"a number {_range_text(min, max, min_open, max_open)}"
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{name}={v!r} must be {what}" + (" or None" if optional else ""))
    f = float(v)
    if not math.isfinite(f) or (min is not None and (f <= min if min_open else f < min)) or \
            (max is not None and (f >= max if max_open else f > max)):
        raise ValueError(f"{name}={v!r} must be {what}")
    return f


def boolean(name: str, v: Any, *, optional: bool = False) -> bool | None:
    if v is None and optional:
        return None
    if not isinstance(v, bool):
        raise TypeError(f"{name}={v!r} must be True or False" + (" (or None)" if optional else ""))
    return v


def choice(name: str, v: Any, choices: Iterable, *, optional: bool = False):
    """One of ``choices`` (compared by value and type, so ``1`` is not ``True``)."""
    choices = tuple(choices)
    if v is None and optional:
        return None
    if not any(type(v) is type(c) and v == c for c in choices):
        accepted = ", ".join(str(c) for c in choices) + (", None" if optional else "")
        raise ValueError(f"{name}={v!r} is not supported; accepted: {accepted}")
    return v


def patterns(name: str, v: Any) -> tuple[str, ...]:
    """Wildcard module-name patterns: one string or a list/tuple of non-empty strings without NUL."""
    if isinstance(v, str):
        v = (v,)
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p and "\x00" not in p for p in v):
        raise TypeError(f"{name} must be a list of non-empty wildcard strings, got {v!r}")
    return tuple(v)


def path(name: str, v: Any, *, optional: bool = False) -> str | None:
    """A non-empty file-system path (str or os.PathLike) without NUL characters."""
    if v is None and optional:
        return None
    if not isinstance(v, (str, os.PathLike)):
        raise TypeError(f"{name}={v!r} must be a path (str or os.PathLike)" + (" or None" if optional else ""))
    s = os.fspath(v)
    if not isinstance(s, str) or not s or "\x00" in s:
        raise ValueError(f"{name}={v!r} is not a usable path (empty, bytes or holding NUL)")
    return s
