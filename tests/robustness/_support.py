"""Shared pieces of the robustness suite: the case tally, the "clear error" check, hypothesis settings,
folder snapshots.

Every case a test tries goes through :func:`case` (``with case("bad_input", label): ...``): it counts as
*tried* on entry and *passed* when the block exits cleanly. A check that the previous output survived goes
through :func:`assert_intact`, which also counts a *data-loss event* when it did not. The conftest prints the
tally and, when ``OPENAUTOGLM_ROBUSTNESS_JSON`` names a file, writes it there (``python -m benchmarks.robustness``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import traceback
from collections import defaultdict
from pathlib import Path

from hypothesis import HealthCheck, settings

from openautoglm.errors import OpenAutoGLMError

CATEGORIES = ("bad_input", "corrupted_files", "untrusted", "kill_points", "exhaustion", "numerical")
TALLY: dict[str, dict[str, int]] = defaultdict(lambda: {"tried": 0, "passed": 0})
DATA_LOSS: list[str] = []
PKG = str(Path(__file__).resolve().parents[2] / "src" / "openautoglm")

# Examples per property test: small and derandomized in CI (reproducible), more with OPENAUTOGLM_FUZZ=N (x N).
FUZZ = max(1, int(os.environ.get("OPENAUTOGLM_FUZZ", "1")))


def fuzz_settings(max_examples: int, deadline_ms: int = 30000):
    """Hypothesis settings of the suite: derandomized (same examples every run), bounded, no example database,
    a per-example deadline (a hang fails the test instead of stalling CI)."""
    return settings(max_examples=max_examples * FUZZ, derandomize=FUZZ == 1, database=None, deadline=deadline_ms,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


@contextlib.contextmanager
def case(category: str, label: str = ""):
    """Count one case of ``category``; it passes when the block raises nothing."""
    assert category in CATEGORIES, category
    TALLY[category]["tried"] += 1
    yield
    TALLY[category]["passed"] += 1


def _innermost_frame(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return tb[-1].filename if tb else ""


def check_clear_error(exc: BaseException, names: list[str] = (), values: list = ()) -> None:
    """Assert ``exc`` is a clear user error: ValueError/TypeError/our own, raised by openautoglm code (not deep
    inside torch/transformers/the stdlib), one-line first line, naming one of ``names`` or ``values``."""
    assert isinstance(exc, (ValueError, TypeError, OpenAutoGLMError)), f"unclear error type {type(exc).__name__}: {exc}"
    where = _innermost_frame(exc)
    assert where.startswith(PKG), f"{type(exc).__name__} raised from {where}, not by openautoglm: {exc}"
    msg = str(exc)
    assert msg.strip(), f"empty {type(exc).__name__} message"
    for bad in ("could not convert string", "object has no attribute", "unsupported operand", "not subscriptable",
                "'NoneType' object", "unhashable type", "Traceback"):
        assert bad not in msg, f"message leaks an internal error: {msg}"
    if names or values:
        needles = [str(n) for n in names] + [repr(v) for v in values] + [str(v) for v in values]
        assert any(n and n in msg for n in needles), f"message names none of {needles[:6]}: {msg}"


def call_clean(fn, *args, names=(), values=(), **kwargs):
    """Run ``fn``; return ``(True, result)`` or ``(False, exc)`` after checking ``exc`` is a clear error."""
    try:
        return True, fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - the property is about which errors escape
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        check_clear_error(e, names, values)
        return False, e


def snapshot(path: Path) -> dict[str, str]:
    """``relative file -> sha256`` of every file under ``path`` ({} when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_intact(path: Path, before: dict[str, str], what: str) -> None:
    """The folder holds exactly what it held before; otherwise count a data-loss event and fail."""
    after = snapshot(path)
    if after != before:
        DATA_LOSS.append(f"{what}: {path}")
        changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
        raise AssertionError(f"data loss ({what}): {path} changed: {changed[:8]}")


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    """Names in ``parent`` other than ``keep`` (temporary or partial folders left behind)."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name not in keep)
