"""What :mod:`benchmarks.quant.speed` runs under Nsight Compute: our w4 decode GEMV (k32, g128) on two 7B layers, M = 1.

    ncu --kernel-name regex:decode --launch-skip 3 --launch-count 2 python -m benchmarks.quant.ncu_target tuned.json

Launches the kernel 4 times on the down projection (N=4096, K=11008), then once on gate/up (N=11008, K=4096),
with the launch configurations tuned earlier in the same run (``tuned.json``), so ncu reports the 4th launch
of the first and the first launch of the second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from openautoglm.quant import QuantConfig
from openautoglm.quant.kernels import ops
from openautoglm.quant.linear import LINEAR_CLASSES


def main(argv: list[str]) -> None:
    if argv and Path(argv[0]).exists():
        tuned = json.loads(Path(argv[0]).read_text())
        ops.GEMV_TUNED.update({tuple(int(v) for v in k.split(",")): c for k, c in tuned.items()})
    for (n, k), reps in (((4096, 11008), 4), ((11008, 4096), 1)):
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        m = LINEAR_CLASSES["w4"].from_linear(lin, QuantConfig(scheme="w4"))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(reps):
            y = m(x)
        torch.cuda.synchronize()
        print(n, k, ops.gemv_config(1, n, k, ops.FMT_INT4_K32, 128, x.device), float(y.float().norm()))


if __name__ == "__main__":
    main(sys.argv[1:])
