"""Helpers shared by the CLI commands: device choice, tables (byte sizes come from :mod:`openautoglm.units`)."""

from __future__ import annotations

import re

import torch
from rich.table import Table

from ..units import format_bytes as fmt_bytes  # noqa: F401  (re-exported for the commands)
from ..units import parse_bytes  # noqa: F401


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N")
    return device


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def read_text_file(path, option: str) -> str:
    """The UTF-8 text of the file an option names; a missing, unreadable or non-UTF-8 file is a ValueError
    naming the option and the file."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{option} {p}: no such file")
    try:
        return p.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ValueError(f"{option} {p}: {e.strerror}") from None


DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")


def check_dtype(dtype: str | None, option: str = "--dtype") -> None:
    """Refuse an unknown --dtype before any model is read."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"{option} {dtype!r} is not supported; accepted: {', '.join(DTYPE_NAMES)}")


def check_json_out(path, option: str = "--json") -> None:
    """Refuse a --json path that could not be written (a folder, or under a missing folder) before the work."""
    if path is None:
        return
    from pathlib import Path

    p = Path(path)
    if p.is_dir() or not p.parent.is_dir():
        raise ValueError(f"{option} {p}: {'is a folder' if p.is_dir() else 'its folder does not exist'}; name a file")


def check_finite(value: float | None, option: str, lo: float | None = None, hi: float | None = None) -> None:
    """click's FloatRange lets NaN through (every comparison with NaN is false): refuse it and infinities."""
    import math

    if value is None:
        return
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else f" >= {lo:g}" if lo is not None else ""
        raise ValueError(f"{option} {value!r} must be a finite number{rng}")
