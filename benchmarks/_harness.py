"""The one harness every benchmark uses: timing, the environment a result was measured in, and JSON output.

Timing (medians; each function names what it measures):

* :func:`time_us` -- microseconds per call of short GPU work: the calls, rotating over copies of their operands
  (so that together they exceed L2), captured in ONE CUDA graph; median of replays, no host launch cost.
* :func:`event_ms` -- milliseconds per call between two CUDA events (``inner`` calls queued back to back between
  them), after warm-up calls; median of ``reps``. On the CPU the same with ``perf_counter``.
* :func:`median_s` -- host wall seconds of a call that cannot be captured (a ``generate`` call, an eager model),
  the device synchronized before and after; median of ``reps`` after warm-up.
* :func:`capture` -- warm a step up on a side stream and capture it in a CUDA graph (or say why not).
* :func:`copy_gbps` -- the device-to-device copy rate (read + write counted), the bandwidth every figure is
  compared with; measured in the same run as the figures.
* :func:`environ` -- set environment switches around a call (ablations), restored afterwards.

Records: :func:`environment` (device, host CPU, Python / torch / transformers / triton / torchao versions, git
commit and dirty flag, UTC date), :func:`write_json` (a temporary file renamed into place: never half written),
:func:`out_dir` (``--out`` default: ``$OUT/<capability>`` on a device run, ``results/<capability>/`` otherwise, a
temporary folder for ``--smoke`` runs so that they never touch the results) and :func:`print_table`.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
T0 = time.time()


def log(*a) -> None:
    """Print with the seconds since the benchmark started."""
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------- timing

def time_us(fns: Sequence[Callable], dev, reps: int = 5) -> float:
    """Median microseconds per call: the calls (rotating over ``fns``, e.g. one per weight copy) captured in one CUDA
    graph and replayed ``reps`` times. On the CPU: the mean wall time of one pass over ``fns`` (a smoke figure)."""
    dev = torch.device(dev)
    if dev.type != "cuda":
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) / len(fns) * 1e6
    for f in fns:
        f()
    torch.cuda.synchronize()
    calls = max(len(fns), 24 // len(fns) * len(fns))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts)


def event_ms(fn: Callable, reps: int = 20, warmup: int = 5, inner: int = 1, cuda: bool | None = None) -> float:
    """Median milliseconds per call of ``fn``: ``inner`` calls queued back to back between two CUDA events (which
    amortizes host-side dispatch, as in a model where the GPU runs ahead of Python), ``reps`` times, after
    ``warmup`` calls. ``cuda=False`` (or no GPU): ``perf_counter`` instead of events."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / inner)
        else:
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            ts.append((time.perf_counter() - t) * 1e3 / inner)
    return statistics.median(ts)


def median_s(fn: Callable, reps: int, warmup: int = 1, before: Callable | None = None) -> float:
    """Median host wall seconds of ``fn()``, the device synchronized around each call (``before``, e.g. a
    ``dist.barrier``, runs first in each timed round)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        sync()
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def capture(step: Callable, warmup: int = 3, reset: Callable | None = None
            ) -> tuple[torch.cuda.CUDAGraph | None, str | None]:
    """``(graph, None)``: ``step`` warmed up ``warmup`` times on a side stream, ``reset()`` (rewind the state the
    warm-up advanced), then ``step`` captured in a CUDA graph; ``(None, reason)`` when the capture fails (the caller
    runs ``step`` eagerly and records the reason)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    if reset is not None:
        reset()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        return g, None
    except Exception as e:  # noqa: BLE001 - the caller falls back to the eager step, and says so
        torch.cuda.synchronize()
        return None, repr(e)[:300]


def copy_gbps(dev) -> float:
    """Device-to-device copy rate in GB/s, read + write counted (1 GiB on the GPU; 1 MiB on the CPU)."""
    dev = torch.device(dev)
    n = (1 << 30) if dev.type == "cuda" else (1 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * n / time_us([lambda: b.copy_(a)], dev) / 1e3


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the calls inside the block (the library reads its switches at call time),
    then restore them: how a benchmark ablates one switch, e.g. ``environ({"OPENAUTOGLM_DENSE_DECODE": "0"})``."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------------- the record

def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty): ``$GIT_COMMIT`` (a copy of the tree without ``.git``, e.g. on a device machine), else the
    checkout's HEAD and whether tracked files differ from it, else a ``COMMIT`` file at the root, else unknown."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"], None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False)
        if head.returncode == 0 and head.stdout.strip():
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=ROOT, check=False)
            return head.stdout.strip(), bool(st.stdout.strip()) if st.returncode == 0 else None
    except OSError:
        pass
    f = ROOT / "COMMIT"
    return (f.read_text().strip(), None) if f.is_file() else ("unknown", None)


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def _version(dist: str) -> str | None:
    """The installed version of a distribution, read from its metadata (nothing is imported: importing a peer such
    as torchao can change global state), or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device=None) -> dict:
    """Where a result was measured: device name (the GPU's, else ``cpu``), host CPU, versions, git commit and dirty
    flag, UTC date. ``device``: the device the benchmark runs on (default: CUDA if present)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    commit, dirty = git_commit()
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "host_cpu": host_cpu(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers"),
            "triton": _version("triton"), "torchao": _version("torchao"), "git_commit": commit, "git_dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def out_dir(capability: str, smoke: bool = False) -> Path:
    """Default output folder: ``$OUT/<capability>`` when ``$OUT`` is set (a device run: the files come back laid out
    as ``results/``), a temporary folder for a smoke run, else ``benchmarks/results/<capability>``."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / capability
    if smoke:
        return Path(tempfile.gettempdir()) / "openautoglm-bench-smoke" / capability
    return RESULTS / capability


def write_json(path, data, indent: int = 1, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON to ``path`` atomically: a temporary file in the same folder, then renamed over it
    (a killed run never leaves a half-written result). Values JSON does not know are written as ``str``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str, sort_keys=sort_keys) + "\n")
    os.replace(tmp, path)
    return path


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
