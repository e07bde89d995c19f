"""Under a hard address-space limit smaller than the model, ``compress`` streams while the in-memory path fails.

A ~290 MB bf16 random Llama (12 layers, 32 MB shards) is written by the fixture, one tensor at a time. Each path
runs in a subprocess (``_limited_run.py``) that calibrates ``RLIMIT_AS`` on itself: after its imports and one
warm-up run on the tiny model, it allows its own size plus 180 MB -- less than the model's 290 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _random_llama import write_random_llama

HEADROOM = 180 * 2**20
RUNNER = Path(__file__).with_name("_limited_run.py")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux-only")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("big") / "llama-290mb"
    return folder, write_random_llama(folder, layers=12, shard_bytes=32 * 2**20)


def _limited(mode: str, src: Path, out: Path, warm: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RUNNER), mode, str(src), str(out), str(HEADROOM), str(warm)],
                          capture_output=True, text=True, env=env, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, f"{mode} run crashed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return {**json.loads(line[7:]), "stdout": proc.stdout}


def test_compress_streams_under_a_limit_smaller_than_the_model(big_model, tiny_llama_dir, tmp_path):
    src, model_bytes = big_model
    assert HEADROOM < 0.65 * model_bytes
    stream = _limited("stream", src, tmp_path / "streamed", tiny_llama_dir)
    assert stream["rc"] == 0, stream
    assert stream["peak_over_base"] <= HEADROOM < model_bytes
    assert (tmp_path / "streamed" / "config.json").is_file()

    eager = _limited("eager", src, tmp_path / "eager", tiny_llama_dir)
    assert eager["rc"] != 0 and ("memory" in eager["error"].lower() or "allocate" in eager["error"]), eager
    assert not (tmp_path / "eager").exists(), "the failed run left no output"

    from openautoglm import hub

    m = hub.from_pretrained(tmp_path / "streamed")
    assert hub.applied_transforms(m)[-1]["config"]["scheme"] == "w4"
