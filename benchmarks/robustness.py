"""Run the robustness suite (tests/robustness) and record its figures in benchmarks/results/robustness.json.

    python benchmarks/robustness.py                 # the CI configuration (derandomized, bounded examples)
    OPENAUTOGLM_FUZZ=10 python benchmarks/robustness.py --out /tmp/deep.json   # 10x the examples, random seeds

The suite counts every case it tries per category (bad input, corrupted files, untrusted code/data, kill
points, exhaustion, numerical faults) and every data-loss event (an output or checkpoint found changed, mixed or
unloadable after a fault; must be 0). This script runs it with pytest, lets the suite's conftest write the tally,
adds the environment (CPU, versions, git commit, date, wall time) and prints a short table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _versions() -> dict:
    import hypothesis
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "hypothesis": hypothesis.__version__}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness.json")
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
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cats = tally["categories"]
    doc = {
        "suite": "tests/robustness", "pytest_exit_code": proc.returncode, "all_passed": proc.returncode == 0,
        "examples_multiplier": int(os.environ.get("OPENAUTOGLM_FUZZ", "1")),
        "bad_input_cases_tried": cats["bad_input"]["tried"], "bad_input_cases_passed": cats["bad_input"]["passed"],
        "corrupted_file_cases": cats["corrupted_files"]["tried"], "kill_points_tried": cats["kill_points"]["tried"],
        "data_loss_events": tally["data_loss_events"], "categories": cats, "data_loss": tally["data_loss"],
        "tests": tally["tests"], "wall_s": round(wall, 1), "device": _cpu(), **_versions(), "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")  # never a half-written result file
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\n{'category':<18}{'tried':>8}{'passed':>8}")
    for c, v in cats.items():
        print(f"{c:<18}{v['tried']:>8}{v['passed']:>8}")
    print(f"data-loss events: {doc['data_loss_events']} (must be 0); pytest exit {proc.returncode}; "
          f"{wall:.0f} s; wrote {args.out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
