"""One layer's fused quantized-KV decode under Nsight Compute: where the kernel's time goes.

Runs the decode (+ reduce) of a 7B-shaped layer (32 KV heads x 128, group 64, residual 128, GQA group 1) at
8k context, batch 1, for INT4 and INT8 and each named launch configuration, three times each (the
first compiles); meant to be run under ``ncu`` (see ``--help``), e.g.::

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section LaunchStats -k regex:"decode|reduce" python -m benchmarks.kv.kernel_profile

``--smoke`` runs tiny shapes on the CPU (Triton interpreter) to check the script.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:  # before torch and triton are imported: interpret the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from benchmarks.kv.kernel_sweep import make_store  # noqa: E402
from openautoglm.kv.kernels import ops  # noqa: E402

CONFIGS = {"dot": dict(vec=False), "vec": dict(vec=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--configs", default="dot,vec")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hkv, d, ctx = (32, 128, 8192) if dev.type == "cuda" else (2, 128, 512)
    for bits in (4, 8):
        st = make_store(bits, 1, hkv, d, ctx, dev, dtype)
        q = torch.randn(1, hkv, 1, d, device=dev, dtype=dtype)
        ref = ops.decode_reference(st.view(), q, None, d ** -0.5).float()
        for name in args.configs.split(","):
            for _ in range(3 if dev.type == "cuda" else 1):
                got = ops.decode_triton(st.view(), q, None, d ** -0.5, CONFIGS[name]).float()
            rel = float((got - ref).norm() / ref.norm())
            print(f"int{bits} {name}: rel err {rel:.2e}", flush=True)


if __name__ == "__main__":
    main()
