"""Hooks of the robustness suite: print the case tally after the run and, when ``OPENAUTOGLM_ROBUSTNESS_JSON``
names a file, write it there (``python -m benchmarks.robustness`` does, into benchmarks/results/robustness/suite.json)."""

from __future__ import annotations

import json
import os
import time

from ._support import CATEGORIES, DATA_LOSS, TALLY

_T0 = time.time()
_OUTCOMES: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if "tests/robustness/" not in report.nodeid.replace("\\", "/"):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        key = "passed" if report.passed else "skipped" if report.skipped else "failed"
        _OUTCOMES[key] += 1


def tally() -> dict:
    cats = {c: dict(TALLY[c]) if c in TALLY else {"tried": 0, "passed": 0} for c in CATEGORIES}
    return {"categories": cats, "data_loss_events": len(DATA_LOSS), "data_loss": list(DATA_LOSS),
            "tests": dict(_OUTCOMES), "elapsed_s": round(time.time() - _T0, 1)}


def pytest_terminal_summary(terminalreporter):
    t = tally()
    if not any(v["tried"] for v in t["categories"].values()):
        return
    w = terminalreporter.write_line
    terminalreporter.section("robustness suite")
    w(f"{'category':<18}{'cases tried':>12}{'passed':>10}")
    for c, v in t["categories"].items():
        w(f"{c:<18}{v['tried']:>12}{v['passed']:>10}")
    w(f"data-loss events: {t['data_loss_events']} (must be 0)")
    path = os.environ.get("OPENAUTOGLM_ROBUSTNESS_JSON")
    if path:
        with open(path, "w") as fh:
            json.dump(t, fh, indent=2)
        w(f"wrote {path}")
