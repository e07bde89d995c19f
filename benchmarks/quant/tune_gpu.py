"""The decode-kernel tuning of :mod:`benchmarks.quant.tune` alone, on the GPU: 7B layer shapes and the fused q/k/v,
gate/up shapes at M = 1 and 8. Writes ``tune_h100.json`` (every configuration's time, the best per shape, the copy
rate of the same run) to ``--out``.

    python -m benchmarks.quant.tune_gpu [--out DIR] [--budget-s 150]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks import _harness as H
from benchmarks.quant import tune

SHAPES = [(4096, 4096, [1, 8]), (11008, 4096, [1, 8]), (4096, 11008, [1, 8]), (12288, 4096, [1]), (22016, 4096, [1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder (default: $OUT/quant, else benchmarks/results/quant)")
    ap.add_argument("--budget-s", type=float, default=150.0)
    args = ap.parse_args()
    t0 = time.time()
    res = tune.run(torch.device("cuda"), torch.bfloat16, SHAPES, [], 2048, args.budget_s,
                   lambda *a: print(f"[{time.time() - t0:6.1f}s]", *a, flush=True))
    res.update(H.environment("cuda"), wall_s=time.time() - t0)
    path = H.write_json(Path(args.out or H.out_dir("quant")) / "tune_h100.json", res)
    for r in res["rows"]:
        print(r["N"], r["K"], r["M"], "bf16", round(r["bf16_GBps"]), "tinygemm", round(r.get("tinygemm_GBps", 0)),
              "w4", round(r.get("f5_GBps", 0)), r.get("f5_cfg"), "w8", round(r.get("f8_GBps", 0)),
              "fp8", round(r.get("f9_GBps", 0)))
    print("wrote", path)


if __name__ == "__main__":
    main()
