"""Child process of test_hub_memlimit: run one compress path under RLIMIT_AS = (own size) + headroom.

RLIMIT_AS caps the address space, not the resident set, and a torch process reserves far more address space
than it touches. So the limit is calibrated against this very process *after* it has imported everything and
run the same path once on a small model (thread pools, lazy imports and allocator arenas then exist already):
what is left is the memory the path itself needs. ``MALLOC_MMAP_THRESHOLD_`` (set by the parent) makes glibc
return freed blocks at once, so the address space tracks live memory instead of heap high-water marks.

    python _limited_run.py stream|eager SRC OUT HEADROOM_BYTES WARMUP_SRC
"""

import json
import resource
import sys

import torch

torch.set_num_threads(1)

from openautoglm import DynamicQuantizer, hub  # noqa: E402
from openautoglm.cli import main  # noqa: E402


def vm(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def run(mode: str, src: str, out: str) -> int:
    if mode == "stream":
        return main(["compress", src, "--bits", "4", "--out", out, "--device", "cpu"])
    model = hub.from_pretrained(src)  # the in-memory path: the whole model, then quantize, then save
    DynamicQuantizer.quantize(model, bits=4)
    model.save_pretrained(out)
    return 0


mode, src, out, headroom, warm = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
run(mode, warm, out + ".warmup")
base = vm("VmSize")
resource.setrlimit(resource.RLIMIT_AS, (base + headroom, base + headroom))
try:
    rc = run(mode, src, out)
    err = ""
except (MemoryError, RuntimeError, OSError) as e:  # the allocation that did not fit
    rc, err = 1, f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps({"rc": rc, "error": err, "base": base, "peak_over_base": vm("VmPeak") - base}), flush=True)
