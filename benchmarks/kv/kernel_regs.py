"""Registers and loop instructions of the GQA-group-1 decode kernel, compiled for sm_90 on the CPU (no GPU).

Compiles ``decode_vec_kernel`` the way ``ops.decode_triton`` launches it on a 7B layer (head_dim 128, group 64;
pointer and stride arguments 16-divisible as at run time) with :mod:`openautoglm.kv.kernels.sass`, reads the
cubin's registers per thread with the ``cuobjdump`` that ships in Triton's NVIDIA backend, and counts the SASS
instructions of the quantized-token loop (one iteration = one tile of ``BLOCK_N`` tokens per warp; the lazily taken
rescale block is counted apart).

    python -m benchmarks.kv.kernel_regs          # table; JSON to benchmarks/results/kv/kernel_regs.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._harness import environment, out_dir, write_json
from openautoglm.kv.kernels import sass

VARIANTS = [dict(lazy=0.0, words=0, block_n=64), dict(lazy=8.0, words=0, block_n=64),
            dict(lazy=0.0, words=2, block_n=64), dict(lazy=8.0, words=2, block_n=64),
            dict(lazy=8.0, words=4, block_n=64), dict(lazy=8.0, words=2, block_n=32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder (default: $OUT/kv, else benchmarks/results/kv)")
    args = ap.parse_args()
    if not sass.available():
        raise SystemExit(f"this Triton has no NVIDIA backend to compile for sm_90 ({sass.CUOBJDUMP} is missing)")
    rows = []
    for bits in (4, 8, 2):
        for v in VARIANTS:
            cubin = sass.compile_vec(bits, **v)
            regs, stack = sass.registers(cubin)
            lp = sass.loop_profile(cubin)
            rows.append({"bits": bits, **v, "registers": regs, "stack_bytes": stack,
                         "programs_per_sm": min(16, 65536 // (regs * 128)), **lp})
            print(f"int{bits} {v}: {regs} registers ({rows[-1]['programs_per_sm']} programs/SM), stack {stack}, "
                  f"{lp['per_tile']} instructions per tile (+{lp['rescale_block']} rescale) {lp['opcodes']}",
                  flush=True)
    res = {**environment("cpu"), "target": "sm_90 (compiled on the CPU)", "layer": "head_dim 128, group 64",
           "rows": rows}
    print("wrote", write_json(Path(args.out or out_dir("kv")) / "kernel_regs.json", res))


if __name__ == "__main__":
    main()
