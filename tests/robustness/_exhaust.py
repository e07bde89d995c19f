"""Resource-exhaustion driver: ``python _exhaust.py SPEC.json REPORT.json``.

Imports the stack once, then forks one child per scenario, sets a real kernel limit in the child and runs the
CLI there: ``RLIMIT_FSIZE`` (writes past the limit fail with EFBIG, SIGXFSZ ignored: a full disk as the
writer sees it) and ``RLIMIT_AS`` (address space a little above what is mapped already: loading runs out of
memory). Each child's exit code and stderr come back to the parent, which checks the folders.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)

from openautoglm.cli import main  # noqa: E402


def vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run(argv: list[str], limit: str, value: int, log: Path) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 99
        try:
            fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1), os.dup2(fd, 2)
            if limit == "fsize":
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (value, value))
            elif limit == "as":
                cap = vm_size() + value
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            code = main(argv)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os.write(w, str(code).encode())
            os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return {"code": int(data) if data else None, "log": log.read_text(errors="replace")[-3000:]}


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["work"])
    # import (lazily loaded) modules now: under RLIMIT_AS the child must fail in the load, not in an import
    import openautoglm.evaluate  # noqa: F401
    import openautoglm.prune  # noqa: F401
    import openautoglm.quant  # noqa: F401
    from openautoglm import hub

    for m in spec.get("warm", []):
        hub.empty_model(m)
        hub.load_tokenizer(m)
    report = {}
    for name, sc in spec["scenarios"].items():
        report[name] = run(sc["argv"], sc["limit"], sc["value"], work / f"{name}.log")
    Path(sys.argv[2]).write_text(json.dumps(report, indent=1))
