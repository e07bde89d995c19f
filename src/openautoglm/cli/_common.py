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
