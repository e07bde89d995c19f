"""openautoglm.units (issue 14, defect 6): byte sizes formatted and parsed below both the library and the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from openautoglm.units import format_bytes, parse_bytes

PKG = Path(__file__).resolve().parents[1] / "src" / "openautoglm"


@pytest.mark.parametrize("text,expected", [
    ("6GiB", 6 * 2**30), ("6 gib", 6 * 2**30), ("512MB", 512 * 10**6), ("1.5e9", 1_500_000_000),
    ("8GB", 8 * 10**9), (" 100 ", 100), ("0.5KiB", 512), ("2TiB", 2 * 2**40), (".5 MiB", 2**19),
    (3 * 2**30, 3 * 2**30), (1e9, 10**9), ("0", 0),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "e", "1e", "6 GiBs", "-1GiB", "nan", "inf", "1e400", "1..2GB", "6 G",
                                 float("nan"), float("inf"), -5, 2.0**70])
def test_parse_bytes_rejects_with_the_value_named(bad):
    with pytest.raises(ValueError, match="size") as e:
        parse_bytes(bad)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize("bad", [None, True, [1], b"6GiB"])
def test_parse_bytes_type_errors(bad):
    with pytest.raises(TypeError, match="size"):
        parse_bytes(bad)


def test_format_bytes_round_trips():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(6 * 2**30) == "6.00 GiB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"
    for n in (2**20, 7 * 2**30 + 123456789, 5 * 2**40):
        assert abs(parse_bytes(format_bytes(n).replace(",", "")) - n) / n < 0.005


def test_library_never_imports_the_cli():
    """Only the CLI package itself and the ``python -m openautoglm`` entry point may import ``openautoglm.cli``."""
    offenders = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (node.module or "").split(".")
                targets = [base] + ([[a.name] for a in node.names] if node.level and not node.module else [])
            else:
                continue
            if any(t[:2] == ["openautoglm", "cli"] or (t[0] == "cli" and getattr(node, "level", 0)) for t in targets):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"library modules import from openautoglm.cli: {offenders}"
