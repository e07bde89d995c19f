"""The benchmarks package stays runnable: every module imports (no GPU needed), and two of the cheapest ``--smoke``
modes run end to end on the CPU and write their JSON record through the harness.

The tests import nothing from ``benchmarks/`` themselves: each check runs in a fresh Python started at the repository
root (``python -m benchmarks...``), with the same ``openautoglm`` as this test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import openautoglm

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in (ROOT / "benchmarks").rglob("*.py"))


def _env() -> dict:
    """The environment of a child at the repository root that imports this session's openautoglm."""
    paths = [str(ROOT), str(Path(openautoglm.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def import_errors() -> dict[str, str]:
    """Import every benchmark module in one child process; module -> error ('' when it imported)."""
    script = ("import importlib, json, sys, traceback\nout = {}\n"
              "for m in sys.argv[1:]:\n"
              "    try:\n        importlib.import_module(m); out[m] = ''\n"
              "    except BaseException:\n        out[m] = traceback.format_exc()[-1500:]\n"
              "print('RESULT ' + json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", script, *MODULES], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, r.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_the_package_has_modules():
    assert "benchmarks._harness" in MODULES and "benchmarks.quant.speed" in MODULES and len(MODULES) > 30


@pytest.mark.parametrize("module", MODULES)
def test_benchmark_module_imports(import_errors, module):
    assert import_errors[module] == "", import_errors[module]


def _smoke(tmp_path: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env={**_env(), "OUT": ""}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, (files, r.stdout[-2000:])
    doc = json.loads(files[0].read_text())
    for key in ("device", "torch", "transformers", "git_commit", "date"):  # the harness's record
        assert doc.get(key), (key, sorted(doc))
    return doc


def test_quant_kernel_sweep_smoke_runs_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    doc = _smoke(tmp_path, "benchmarks.quant.kernels_gpu", "--smoke", "--out", str(tmp_path))
    assert doc["smoke"] is True and doc["rows"] and doc["rows"][0]["bf16_us"] > 0
    assert any(f"f{f}_us" in r for r in doc["rows"] for f in (4, 8, 9)), doc["rows"]  # a kernel ran and was timed


def test_budget_fit_smoke_plans_and_fits_on_the_cpu(tmp_path):
    doc = _smoke(tmp_path, "benchmarks.auto.fit_gpu", "--smoke", "--out", str(tmp_path / "fit.json"))
    assert doc["peak_allocated_within_budget"] is True and doc["measured"]["peak"] > 0


@pytest.mark.slow
def test_moe_bench_smoke_runs_every_row_on_the_cpu(tmp_path):
    """benchmarks.moe.bench --smoke: the GPU benchmark's code on tiny Qwen3-MoE / Mixtral shapes (30 s of CPU time)."""
    doc = _smoke(tmp_path, "benchmarks.moe.bench", "--smoke", "--out", str(tmp_path))
    rows = [r for rs in doc["shapes"].values() for r in rs]
    assert rows and not any("error" in r for r in rows), [r.get("error") for r in rows]
    w4 = next(r for r in rows if r["variant"] == "w4" and r["shape"] == "smoke-qwen3")
    assert w4["x_bf16"]["weight_bytes"] < 0.5 and w4["quality_vs_bf16"]["logits_cosine_mean"] > 0.9
    assert 0.9 < w4["memory_prefill"]["estimate_over_measured"] < 1.2
