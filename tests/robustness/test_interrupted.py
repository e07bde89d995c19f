"""Interrupted runs: ``compress`` and ``train`` SIGKILLed at every file-system event of their save (before it or
halfway through a write), in both swap modes (atomic exchange, two renames), and at seeded random times.

One subprocess per command (``_killer.py``) imports the stack once and forks a child per run. The checks:
the output folder is always exactly the previous or the new complete one and loads; a killed first write
leaves no folder; what a killed writer left is cleared on the next access; a training checkpoint always
loads and never goes back; ``train`` resumed after each kill ends with the same loss curve (bitwise) as an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._support import DATA_LOSS, TALLY, case

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]
KILLER = Path(__file__).with_name("_killer.py")


def _drive(spec: dict, tmp_path: Path) -> dict:
    spec_f, report_f = tmp_path / "spec.json", tmp_path / "report.json"
    spec_f.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(KILLER), str(spec_f), str(report_f)], env=env, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report_f.read_text())


def _tally(report: dict) -> None:
    for p in report["points"]:
        with case("kill_points", p["label"]):
            pass
    DATA_LOSS.extend(f"{report['mode']}: {x}" for x in report["data_loss"])
    if report["data_loss"]:  # the kill points above counted as passed; the losses fail the category
        TALLY["kill_points"]["passed"] -= len(report["data_loss"])


def test_compress_killed_at_every_save_event(tiny_llama_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    report = _drive({"mode": "compress", "model": str(tiny_llama_dir), "work": str(work), "seed": 14,
                     "limit": 8, "limit_fallback": 3, "limit_first": 2, "random_kills": 1}, tmp_path)
    _tally(report)
    pts = report["points"]
    assert len(pts) >= 13 and sum(p["killed"] for p in pts) >= 11, pts
    assert report["data_loss"] == [], report["data_loss"]
    assert report["leftovers"] == [], report["leftovers"]
    states = {p["state"] for p in pts}
    assert {"old", "new"} <= states, "kill points should fall both before and after the swap"
    assert any(p["state"] == "absent" for p in pts if p["scenario"] == "first write")


def test_train_killed_and_resumed_matches_uninterrupted(tiny_llama_dir, tmp_path):
    from openautoglm.evaluate import load_heldout_text

    text = load_heldout_text()
    (tmp_path / "train.txt").write_text(text[:20000])
    (tmp_path / "eval.txt").write_text(text[-8000:])
    work = tmp_path / "work"
    work.mkdir()
    report = _drive({"mode": "train", "model": str(tiny_llama_dir), "work": str(work), "seed": 14,
                     "text": str(tmp_path / "train.txt"), "limit": 8, "random_kills": 1, "t_clean": 3.0,
                     "train_args": ["--steps", "6", "--global-batch", "2", "--micro-batch", "1", "--seq", "32",
                                    "--amp", "none", "--save-every", "2", "--eval-text", str(tmp_path / "eval.txt"),
                                    "--eval-every", "3", "--no-progress", "--device", "cpu", "--lr", "1e-3"]},
                    tmp_path)
    _tally(report)
    assert sum(p["killed"] for p in report["points"]) >= len(report["points"]) // 2, report["points"]
    assert report["data_loss"] == [], report["data_loss"]
    assert report["curve_mismatch"] == [], json.dumps(report["resumed_runs"], indent=1)[:3000]
    assert any(r["resumed_from"] > 0 for r in report["resumed_runs"]), "no run resumed from a checkpoint"
    assert report["leftovers"] == [], report["leftovers"]
