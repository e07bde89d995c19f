"""Registers and loop instructions of the GQA-group-1 decode kernel, compiled for sm_90 on the CPU (no GPU).

Compiles ``decode_vec_kernel`` the way ``ops.decode_triton`` launches it on a 7B layer (head_dim 128, group 64;
pointer and stride arguments 16-divisible as at run time), reads the cubin's registers per thread with the
``cuobjdump`` that ships in Triton's NVIDIA backend, and counts the SASS instructions of the quantized-token
loop (one iteration = one tile of ``BLOCK_N`` tokens per warp; the lazily taken rescale block is counted apart).

    python benchmarks/kv_kernel_regs.py                 # table; JSON to benchmarks/results/kv_kernel_regs.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from openautoglm.kv.kernels import triton_vec  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTRS = {"q_ptr": "*bf16", "kq_ptr": "*u8", "ks_ptr": "*fp16", "km_ptr": "*fp16", "vq_ptr": "*u8", "vs_ptr": "*fp16",
        "vm_ptr": "*fp16", "rk_ptr": "*bf16", "rv_ptr": "*bf16", "len_ptr": "*i32", "mask_ptr": "*i32",
        "o_ptr": "*fp32", "lse_ptr": "*fp32", "sm_scale": "fp32"}


def compile_sm90(fn, const: dict, ptrs: dict, num_warps: int = 4, num_stages: int = 3) -> bytes:
    """The sm_90 cubin of the Triton kernel ``fn`` with constexprs ``const``; ``ptrs`` names the pointer (and float)
    arguments' types, every other argument is an i32; pointers and ``s*`` stride arguments are marked 16-divisible,
    as Triton specializes them at run time."""
    names = fn.arg_names
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
    div = [n for n in names if n not in const and (n.endswith("_ptr") or (n.startswith("s") and sig[n] == "i32"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
    return k.asm["cubin"]


def compile_vec(bits: int, block_n: int = 64, lazy: float = 0.0, words: int = 0, num_warps: int = 4,
                d: int = 128, group: int = 64) -> bytes:
    """The sm_90 cubin of one decode_vec_kernel launch (no mask, no sliding window)."""
    gv = min(group, d)
    const = dict(HKV=32, D=d, BITS=bits, G=group, BLOCK_N=block_n, GV=gv, R=128, WINDOW=0, RING_FROM_NQ=False,
                 HAS_MASK=False, CP=min(d * bits // 8, gv), LAZY=float(lazy), WORDS=int(words))
    return compile_sm90(triton_vec.decode_vec_kernel, const, PTRS, num_warps, 3)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([str(BIN / "cuobjdump"), flag, path], capture_output=True, text=True, check=True).stdout


def registers(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes) of the cubin's kernel."""
    out = _cuobjdump(cubin, "-res-usage")
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def loop_profile(cubin: bytes) -> dict:
    """SASS instructions of the first loop (the quantized tiles): total, the block its forward branches skip
    (the lazy rescale), and the opcodes of the path a tile takes without it."""
    ins = []
    for line in _cuobjdump(cubin, "-sass").splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    back = [(a, int(t.group(1), 16)) for a, s in ins if (t := re.search(r"BRA\s+(?:`?\(?)0x([0-9a-f]+)", s))
            and int(t.group(1), 16) < a]
    end, start = min(back)  # the first backward branch closes the tile loop
    body = [(a, s) for a, s in ins if start <= a <= end]
    skipped = set()
    for a, s in body:
        t = re.search(r"@!?P\d\s+BRA\s+0x([0-9a-f]+)", s)
        if t and a < int(t.group(1), 16) <= end:
            skipped |= {b for b, _ in body if a < b < int(t.group(1), 16)}
    ops = collections.Counter(re.sub(r"^@!?U?P[0-9T]\s+", "", s).split()[0].split(".")[0]
                              for a, s in body if a not in skipped)
    return {"loop": len(body), "rescale_block": len(skipped), "per_tile": len(body) - len(skipped),
            "opcodes": dict(ops.most_common(12))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv_kernel_regs.json"))
    args = ap.parse_args()
    variants = [dict(lazy=0.0, words=0, block_n=64), dict(lazy=8.0, words=0, block_n=64),
                dict(lazy=0.0, words=2, block_n=64), dict(lazy=8.0, words=2, block_n=64),
                dict(lazy=8.0, words=4, block_n=64), dict(lazy=8.0, words=2, block_n=32)]
    rows = []
    for bits in (4, 8, 2):
        for v in variants:
            cubin = compile_vec(bits, **v)
            regs, stack = registers(cubin)
            lp = loop_profile(cubin)
            rows.append({"bits": bits, **v, "registers": regs, "stack_bytes": stack,
                         "programs_per_sm": min(16, 65536 // (regs * 128)), **lp})
            print(f"int{bits} {v}: {regs} registers ({rows[-1]['programs_per_sm']} programs/SM), stack {stack}, "
                  f"{lp['per_tile']} instructions per tile (+{lp['rescale_block']} rescale) {lp['opcodes']}",
                  flush=True)
    res = {"triton": triton.__version__, "target": "sm_90 (compiled on the CPU)", "layer": "head_dim 128, group 64",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
