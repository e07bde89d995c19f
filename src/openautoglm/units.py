"""Byte sizes for people: formatting and parsing, shared by the library and the CLI.

Decimal units (``KB``, ``MB``, ``GB``, ``TB``) are powers of 1000 and binary units (``KiB``, ``MiB``, ``GiB``,
``TiB``) powers of 1024, as in IEC 80000-13; unit names are case-insensitive. Sizes are printed in binary
units (what ``nvidia-smi`` and ``torch.cuda.memory_summary`` show).
"""

from __future__ import annotations

import math
import numbers
import re

UNITS: dict[str, int] = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*")
_ACCEPTED = "e.g. 6GiB, 512MiB, 8GB, 1.5e9 or a number of bytes (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def format_bytes(n: float) -> str:
    """``1610612736 -> "1.50 GiB"``; below 1 KiB a whole number of bytes (``"512 B"``)."""
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(size: str | int | float) -> int:
    """Read a size such as ``"6GiB"``, ``"512 MB"``, ``"1.5e9"`` or ``8 * 2**30`` as a whole number of bytes.

    Raises
    ------
    ValueError
        naming the text when it is not a finite, non-negative size with a known unit.
    TypeError
        when ``size`` is neither text nor a real number.
    """
    if isinstance(size, bool) or not isinstance(size, (str, numbers.Real)):
        raise TypeError(f"a size must be text or a number of bytes, got {type(size).__name__} {size!r}")
    if isinstance(size, numbers.Real):
        value, unit = float(size), "B"
    else:
        m = _SIZE.fullmatch(size)
        unit = (m.group(2) or "B").upper() if m else ""
        if not m or unit not in UNITS:
            raise ValueError(f"cannot read the size {size!r}; write {_ACCEPTED}")
        value = float(m.group(1))
    total = value * UNITS[unit]
    if not math.isfinite(total) or total < 0 or total >= 2**63:
        raise ValueError(f"size {size!r} must be a finite, non-negative number of bytes below 2**63; write {_ACCEPTED}")
    return int(total)
