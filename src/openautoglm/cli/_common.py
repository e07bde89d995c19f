"""Helpers shared by the CLI commands: loading, byte formatting, tables."""

from __future__ import annotations

import re

import torch
from rich.table import Table

_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """Parse ``"6GiB"``, ``"512 MB"``, ``"1.5e9"`` into bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = (m.group(2) or "B").upper() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 6GiB, 512MiB, 8GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


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
