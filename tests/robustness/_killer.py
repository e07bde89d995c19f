"""Kill-point driver for the interrupted-run tests: ``python _killer.py SPEC.json REPORT.json``.

Imports torch/transformers/openautoglm once, then forks one child per run of the real CLI (``compress`` or
``train``) and SIGKILLs it at a chosen *event*: every rename/exchange/delete/copy and every file write of the
run is an event (counted in a clean run first), killed either just before it or in the middle of the write
(half the bytes on disk); plus kills at seeded random times. After each kill the parent checks what a user
would find: the output folder is exactly the previous or the new complete one and loads, the training
checkpoint loads, leftovers vanish on the next access; ``train`` is resumed until it finishes and its loss
curve is compared with an uninterrupted run. Forking keeps the ~4 s import out of every run.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)  # forked children must not inherit a started OpenMP pool; one thread is deterministic

from openautoglm import hub
from openautoglm._util import atomic as _atomic  # noqa: E402
from openautoglm.cli import main  # noqa: E402

WRITE_MODES = ("w", "a", "x", "+")


def snapshot(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the child's tripwire

class Trip:
    """Counts events; at event ``kill_at`` kills the process, before the operation or halfway through it."""

    def __init__(self, work: Path, kill_at: int | None, mid: bool, log: list) -> None:
        self.work, self.kill_at, self.mid, self.log, self.n = str(work), kill_at, mid, log, 0

    def event(self, label: str, can_mid: bool = False) -> bool:
        """Record ``label``; kill now (before) or return True when the caller must do half and kill."""
        self.n += 1
        self.log.append([label, can_mid])
        if self.n == self.kill_at:
            if self.mid and can_mid:
                return True
            die()
        return False


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(trip: Trip, exchange: bool) -> None:
    import safetensors.torch as st
    import transformers.modeling_utils as mu

    from openautoglm.training import loop as train_mod

    def wrap_simple(mod, name, label):
        real = getattr(mod, name)

        def fn(*a, **k):
            trip.event(f"{label} {Path(str(a[-1] if a else '')).name}")
            return real(*a, **k)
        setattr(mod, name, fn)

    for mod, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree"), (shutil, "copy2")):
        wrap_simple(mod, name, name)
    real_exchange = _atomic._exchange
    if exchange:
        _atomic._exchange = lambda a, b: (trip.event(f"exchange {Path(b).name}"), real_exchange(a, b))[1]
    else:
        _atomic._exchange = lambda a, b: False  # the two-rename fallback of file systems without RENAME_EXCHANGE

    def wrap_save(mod, name):
        real = getattr(mod, name)

        def fn(obj, filename, *a, **k):
            half = trip.event(f"save {Path(str(filename)).name}", can_mid=True)
            out = real(obj, filename, *a, **k)
            if half:
                f = Path(str(filename))
                os.truncate(f, f.stat().st_size // 2)
                die()
            return out
        setattr(mod, name, fn)

    wrap_save(mu, "safe_save_file")
    wrap_save(st, "save_file")
    wrap_save(st, "save_model")
    real_open = builtins.open

    class HalfWriter:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: max(1, len(data) // 2)])
            self.fh.flush()
            die()

        def __getattr__(self, k):
            return getattr(self.fh, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in WRITE_MODES) \
                and os.path.abspath(os.fspath(file)).startswith(trip.work):
            half = trip.event(f"write {Path(os.fspath(file)).name}", can_mid=True)
            fh = real_open(file, mode, *a, **k)
            return HalfWriter(fh) if half else fh
        return real_open(file, mode, *a, **k)

    builtins.open = open_
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):  # the streaming writer writes each tensor at its offset
        half = trip.event(f"pwrite {os.readlink(f'/proc/self/fd/{fd}').rsplit('/', 1)[-1]}", can_mid=True)
        if half:
            real_pwrite(fd, bytes(data)[: max(1, len(data) // 2)], offset)
            die()
        return real_pwrite(fd, data, offset)

    os.pwrite = pwrite
    real_batch = train_mod.batch_at

    def batch_at(ids, step, micro, cfg):
        if micro == 0:
            trip.event(f"step {step}")
        return real_batch(ids, step, micro, cfg)

    train_mod.batch_at = batch_at


def run_child(argv: list[str], work: Path, *, kill_at=None, mid=False, exchange=True, kill_after_s=None,
              events_file: Path | None = None) -> dict:
    """Fork; the child runs ``openautoglm argv`` under the tripwire. Returns how it ended."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 99
        log: list = []
        try:
            fd = os.open(str(work / "child.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1), os.dup2(fd, 2)
            install(Trip(work, kill_at, mid, log), exchange)
            code = main(argv)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os.write(w, json.dumps({"code": code, "events": log}).encode())
            os.close(w)
            os._exit(code if isinstance(code, int) else 98)
    os.close(w)
    status = None
    if kill_after_s is not None:
        deadline = time.time() + kill_after_s
        while time.time() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            time.sleep(0.005)
        if status is None:
            os.kill(pid, signal.SIGKILL)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    if status is None:
        _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    info = json.loads(data) if data else {"code": None, "events": []}
    return {"killed": killed or not data, "code": info["code"], "events": info["events"]}


def kill_points(events: list, limit: int, rng: random.Random) -> list[tuple[int, bool, str]]:
    """(event index 1.., halfway?, label) for every event (and the halfway variant of writes), sampled down to
    ``limit``: the swap events (rename, exchange, rmtree) always, the rest by a seeded draw."""
    pts = [(i + 1, False, lab) for i, (lab, _) in enumerate(events)]
    pts += [(i + 1, True, lab) for i, (lab, can_mid) in enumerate(events) if can_mid]
    if len(pts) <= limit:
        return pts
    swap = [p for p in pts if p[2].split()[0] in ("rename", "replace", "exchange", "rmtree") and not p[1]]
    rest = [p for p in pts if p not in swap]
    return swap[:limit] + rng.sample(rest, max(0, limit - len(swap)))


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# ----------------------------------------------------------------------------- compress

def drive_compress(spec: dict, report: dict) -> None:
    work = Path(spec["work"])
    rng = random.Random(spec["seed"])
    parent = work / "outputs"
    parent.mkdir()
    out = parent / "model-out"  # (a fixed path: saved files do not depend on it, so snapshots compare)
    old_copy = work / "old-copy"
    args = ["compress", spec["model"], "--out", str(out)]
    first = run_child(args + ["--bits", "8"], work)
    assert first["code"] == 0 and not first["killed"], f"clean compress failed: {first}"
    s_old = snapshot(out)
    shutil.copytree(out, old_copy)
    t0 = time.time()
    clean = run_child(args + ["--bits", "4", "--overwrite"], work)
    t_clean = time.time() - t0
    assert clean["code"] == 0, f"clean compress --overwrite failed: {clean}"
    s_new = snapshot(out)
    assert s_new != s_old
    plans = [(p, True, "replace") for p in kill_points(clean["events"], spec["limit"], rng)]
    plans += [(p, False, "replace (two renames)") for p in kill_points(
        run_child(args + ["--bits", "4", "--overwrite"], work, exchange=False)["events"], spec["limit_fallback"], rng)]
    plans += [((None, False, f"random {t:.2f}s"), True, "replace") for t in
              (rng.uniform(0.1, 0.8) * t_clean for _ in range(spec["random_kills"]))]
    shutil.rmtree(out)
    fresh = run_child(args + ["--bits", "4"], work)  # the events of a first write (no folder to replace)
    assert fresh["code"] == 0 and snapshot(out) == s_new, f"clean first compress failed: {fresh}"
    plans += [(p, True, "first write") for p in kill_points(fresh["events"], spec["limit_first"], rng)]
    for (k, mid, label), exchange, scenario in plans:
        if out.exists():
            shutil.rmtree(out)
        if scenario != "first write":
            shutil.copytree(old_copy, out)
        t = float(label.split()[1][:-1]) if label.startswith("random") else None
        res = run_child(args + ["--bits", "4", "--overwrite"], work, kill_at=k, mid=mid, exchange=exchange,
                        kill_after_s=t)
        point = {"scenario": scenario, "event": k, "halfway": mid, "label": label, "killed": res["killed"]}
        _check_output(out, parent, s_old if scenario != "first write" else None, s_new, point, report)
        report["points"].append(point)


def _check_output(out: Path, parent: Path, s_old, s_new, point: dict, report: dict) -> None:
    """After a kill: ``out`` is the previous or the new complete folder and loads; leftovers go on next access."""
    try:
        hub.resolve_model_path(out)  # what a user does next; also clears what the killed writer left
    except Exception:  # noqa: BLE001 - a missing folder is judged below
        pass
    snap = snapshot(out)
    if s_old is None:
        ok = snap in ({}, s_new)
    else:
        ok = snap in (s_old, s_new)
    point["state"] = "new" if snap == s_new else "old" if snap == s_old else "absent" if not snap else "MIXED"
    if not ok:
        report["data_loss"].append(f"{point['label']} ({point['scenario']}): output is {point['state']}")
    if snap:
        try:
            hub.from_pretrained(out)
        except Exception as e:  # noqa: BLE001
            report["data_loss"].append(f"{point['label']}: output does not load: {e}")
    left = leftovers(parent, {"model-out"})
    if left:
        report["leftovers"].append(f"{point['label']}: {left}")


# ----------------------------------------------------------------------------- train

def drive_train(spec: dict, report: dict) -> None:
    work = Path(spec["work"])
    rng = random.Random(spec["seed"])
    base = ["train", spec["model"], "--text", spec["text"], *spec["train_args"]]
    ref = run_child(base + ["--out", str(work / "ref")], work)
    assert ref["code"] == 0, f"uninterrupted train failed: {ref}"
    ref_res = json.loads((work / "ref" / "train_result.json").read_text())
    report["reference_losses"] = ref_res["losses"]
    run = work / "run"
    t_clean = spec.get("t_clean") or 2.0
    points = kill_points(ref["events"], spec["limit"], rng)
    points.sort(key=lambda p: (p[0], p[1]))
    schedule = [(k, mid, lab, None) for k, mid, lab in points]
    schedule += [(None, False, "random", rng.uniform(0.3, 1.0) * t_clean) for _ in range(spec["random_kills"])]
    rng.shuffle(schedule)
    last_step = 0
    for k, mid, label, after in schedule:
        res = run_child(base + ["--out", str(run)], work, kill_at=k, mid=mid, kill_after_s=after)
        point = {"event": k, "halfway": mid, "label": label if after is None else f"random {after:.2f}s",
                 "killed": res["killed"], "code": res["code"]}
        report["points"].append(point)
        if not res["killed"] and res["code"] != 0:
            report["data_loss"].append(f"{point['label']}: the resumed run failed with exit {res['code']}")
            continue
        step = _check_checkpoint(run, point, report)
        if step is not None and step < last_step:
            report["data_loss"].append(f"{point['label']}: checkpoint went back from step {last_step} to {step}")
        last_step = max(last_step, step or 0)
        if (run / "model").exists():
            try:
                hub.from_pretrained(run / "model")
            except Exception as e:  # noqa: BLE001
                report["data_loss"].append(f"{point['label']}: final model does not load: {e}")
        if not res["killed"]:  # it finished: start the next interrupted run from scratch
            _compare(run, ref_res, report, point)
            shutil.rmtree(run)
            last_step = 0
    fin = run_child(base + ["--out", str(run)], work)
    assert fin["code"] == 0, f"final resume failed: {fin}"
    _compare(run, ref_res, report, {"label": "final"})
    report["leftovers"] += [f"train: {x}" for x in leftovers(run, {"checkpoint", "model", "train_result.json"})]


def _check_checkpoint(run: Path, point: dict, report: dict) -> int | None:
    from openautoglm.training import checkpoints as io

    if not run.exists() or not io.has_checkpoint(run):
        return None
    d = run / io.CKPT
    try:
        for f in ("model.safetensors", "optimizer.safetensors"):
            hub.validate_safetensors(d / f)
        return int(json.loads((d / "trainer.json").read_text())["step"])
    except Exception as e:  # noqa: BLE001
        report["data_loss"].append(f"{point['label']}: checkpoint does not load: {e}")
        return None


def _compare(run: Path, ref: dict, report: dict, point: dict) -> None:
    res = json.loads((run / "train_result.json").read_text())
    same = res["losses"] == ref["losses"] and [e["loss"] for e in res["evals"]] == [e["loss"] for e in ref["evals"]]
    report["resumed_runs"].append({"after": point["label"], "resumed_from": res["resumed_from"],
                                   "losses_identical": same, "losses": res["losses"]})
    if not same:
        report["curve_mismatch"].append(point["label"])


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    report = {"mode": spec["mode"], "points": [], "data_loss": [], "leftovers": [], "resumed_runs": [],
              "curve_mismatch": []}
    t0 = time.time()
    (drive_compress if spec["mode"] == "compress" else drive_train)(spec, report)
    report["elapsed_s"] = round(time.time() - t0, 1)
    Path(sys.argv[2]).write_text(json.dumps(report, indent=1))
