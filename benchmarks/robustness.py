"""Run the robustness suite (tests/robustness) and record its figures in benchmarks/results/robustness/suite.json.

    python -m benchmarks.robustness                 # the CI configuration (derandomized, bounded examples)
    OPENAUTOGLM_FUZZ=10 python -m benchmarks.robustness --out /tmp/deep.json   # 10x the examples, random seeds

The suite counts every case it tries per category (bad input, corrupted files, untrusted code/data, kill
points, exhaustion, numerical faults) and every data-loss event (an output or checkpoint found changed, mixed or
unloadable after a fault; must be 0). This script runs it with pytest, lets the suite's conftest write the tally,
adds the environment (CPU, versions, git commit, date, wall time) and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import ROOT, environment, host_cpu, out_dir, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default: suite.json in $OUT/robustness, else in "
                    "benchmarks/results/robustness)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -x)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tally_f = Path(tmp) / "tally.json"
        env = {**os.environ, "OPENAUTOGLM_ROBUSTNESS_JSON": str(tally_f),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/robustness",
                               *args.pytest_args], cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        if not tally_f.is_file():
            print("the suite wrote no tally (collection error?)", file=sys.stderr)
            return proc.returncode or 1
        tally = json.loads(tally_f.read_text())
    cats = tally["categories"]
    doc = {
        "suite": "tests/robustness", "pytest_exit_code": proc.returncode, "all_passed": proc.returncode == 0,
        "examples_multiplier": int(os.environ.get("OPENAUTOGLM_FUZZ", "1")),
        "bad_input_cases_tried": cats["bad_input"]["tried"], "bad_input_cases_passed": cats["bad_input"]["passed"],
        "corrupted_file_cases": cats["corrupted_files"]["tried"], "kill_points_tried": cats["kill_points"]["tried"],
        "data_loss_events": tally["data_loss_events"], "categories": cats, "data_loss": tally["data_loss"],
        "tests": tally["tests"], "wall_s": round(wall, 1), **environment("cpu"), "device": host_cpu(),
        "hypothesis": __import__("hypothesis").__version__,
    }
    args.out = write_json(args.out or out_dir("robustness") / "suite.json", doc, indent=2)
    print(f"\n{'category':<18}{'tried':>8}{'passed':>8}")
    for c, v in cats.items():
        print(f"{c:<18}{v['tried']:>8}{v['passed']:>8}")
    print(f"data-loss events: {doc['data_loss_events']} (must be 0); pytest exit {proc.returncode}; "
          f"{wall:.0f} s; wrote {args.out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
