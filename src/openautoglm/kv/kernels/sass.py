"""A Triton kernel compiled for sm_90 on any machine (no GPU needed): its cubin, registers per thread and SASS.

Used by the kernel tests (no spills, register budgets, 16-byte loads, instruction counts of a loop) and by
``benchmarks/kv/kernel_regs.py``. It needs the NVIDIA backend of Triton (``cuobjdump`` ships in it); where that is
missing, :func:`available` says so and the callers skip.

* :func:`compile_sm90` -- the sm_90 cubin of any ``@triton.jit`` function, given its constexprs and the types of
  its pointer (and float) arguments;
* :func:`compile_vec` -- one ``decode_vec_kernel`` launch (:mod:`.triton_vec`) as ``ops.decode_triton`` makes it on
  a 7B layer;
* :func:`registers`, :func:`cuobjdump`, :func:`loop_profile` -- what the cubin holds.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
CUOBJDUMP = BIN / "cuobjdump"
VEC_PTRS = {"q_ptr": "*bf16", "kq_ptr": "*u8", "ks_ptr": "*fp16", "km_ptr": "*fp16", "vq_ptr": "*u8",
            "vs_ptr": "*fp16", "vm_ptr": "*fp16", "rk_ptr": "*bf16", "rv_ptr": "*bf16", "len_ptr": "*i32",
            "mask_ptr": "*i32", "o_ptr": "*fp32", "lse_ptr": "*fp32", "sm_scale": "fp32"}


def available() -> bool:
    """Whether this Triton can compile for sm_90 and read the result (its NVIDIA backend's ``cuobjdump``)."""
    return CUOBJDUMP.exists()


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
    """The sm_90 cubin of one ``decode_vec_kernel`` launch (head_dim ``d``, 32 KV heads, no mask, no sliding
    window)."""
    from . import triton_vec

    gv = min(group, d)
    const = dict(HKV=32, D=d, BITS=bits, G=group, BLOCK_N=block_n, GV=gv, R=128, WINDOW=0, RING_FROM_NQ=False,
                 HAS_MASK=False, CP=min(d * bits // 8, gv), LAZY=float(lazy), WORDS=int(words))
    return compile_sm90(triton_vec.decode_vec_kernel, const, VEC_PTRS, num_warps, 3)


def cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` of the cubin (``-sass``: the instructions; ``-res-usage``: registers, stack...)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([str(CUOBJDUMP), flag, path], capture_output=True, text=True, check=True).stdout


def registers(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes) of the cubin's kernel."""
    out = cuobjdump(cubin, "-res-usage")
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def loop_profile(cubin: bytes) -> dict:
    """SASS instructions of the first loop (for the decode kernels: the quantized tiles): total, the block its
    forward branches skip (the lazy rescale), and the opcodes of the path a tile takes without it."""
    ins = []
    for line in cuobjdump(cubin, "-sass").splitlines():
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
