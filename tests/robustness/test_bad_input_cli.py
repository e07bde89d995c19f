"""Bad input, CLI side: every option of every command (read from the click command tree, so options added
later are fuzzed too) gets accepted values and garbage, in-process through ``main(argv)``.

Properties: the exit status is 0 or 2 (never 1, the status of an internal failure), no traceback, a usage
error names the option or the value, nothing is written where a run failed. Commands that load weights run on
a model path that does not exist, so every argv that passes validation stops at "unknown model" at once;
there the oracle below says whether the value was acceptable, and a bad value that got as far as loading the
model is a failure: options must be checked before minutes are spent loading a large checkpoint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

from openautoglm.cli import app, main

from ._support import case, fuzz_settings, leftovers

pytestmark = pytest.mark.timeout(600)

ROOT = typer.main.get_command(app)
MISSING = "/nonexistent/openautoglm-robustness/model"


def _options(cmd: str) -> dict[str, object]:
    """``--name -> click parameter`` of a command (the first long name of each option)."""
    out = {}
    for p in ROOT.commands[cmd].params:
        if type(p).__name__.endswith("Option"):
            longs = [o for o in p.opts if o.startswith("--")]
            if longs:
                out[longs[0]] = p
    return out


# ----------------------------------------------------------------------------- values

TEXTS = st.text(max_size=12)
SPECIAL = ["", " ", "0", "-1", "1", "2", "nan", "inf", "-inf", "1e400", "1e-400", "99999999999999999999999",
           "0x10", "1.5", "\x00", "a" * 300, "/", ".", "..", "/dev/null", "é", "--bits"]
POOLS = {
    "--bits": ["4", "8"], "--scheme": ["w8a8", "w8a8-fp8", "w8", "w4", "static"], "--group-size": ["32", "64", "128"],
    "--observer": ["minmax", "percentile"], "--device": ["auto", "cpu", "cuda", "cuda:1", "mps", "tpu"],
    "--dtype": ["auto", "bf16", "fp16", "fp32", "int8", "float64"], "--sparsity-method": ["magnitude", "wanda"],
    "--sparsity-pattern": ["unstructured", "2:4", "1:4"], "--kv-dtype": ["bf16", "fp16", "fp32", "int4", "fp8"],
    "--quant": ["w4", "w8", "int3"], "--optimizer": ["adamw", "adamw_foreach", "sgd", "adafactor", "lamb"],
    "--amp": ["bf16", "fp16", "none"], "--mode": ["inference", "train"], "--budget": ["24GiB", "1KB", "512 MB", "-5GB"],
    "--include": ["*mlp*", "*"], "--exclude": ["lm_head", "*"], "--kv-bits": ["2", "4", "8", "3"],
    "--kv-group-size": ["32", "64", "48"], "--global-batch": ["1", "8", "1000000000000"], "--micro-batch": ["1", "2", "3"],
    "--seed": ["0", "-1", str(2**64), str(2**70)], "--temperature": ["0.7", "nan", "inf"], "--top-p": ["0.9", "nan"],
    "--max-tokens": ["0", "1", "2", "64"], "--batch": ["1", "3", "10000000000"], "--context": ["1", "2048", str(10**15)],
    "--seq": ["2", "128", str(10**15)], "--tp": ["1", "2", "3"],
}


def _kind(param) -> str:
    """int, float, str, Path, bool or list of the option (typer >= 0.2x params carry an annotation; older
    click params a ``type``)."""
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if ann is not None:
        return getattr(ann, "__name__", str(ann))
    return {"IntParamType": "int", "IntRange": "int", "FloatParamType": "float", "FloatRange": "float"}.get(
        type(getattr(param, "type", None)).__name__, "str")


def values_for(opt: str, param, files: dict) -> st.SearchStrategy[str]:
    kind = _kind(param)
    pool = POOLS.get(opt, []) + [str(files[k]) for k in files if k != "out"]
    if kind == "int":
        base = st.integers(-(10**20), 10**20).map(str)
    elif kind == "float":
        base = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    else:
        base = TEXTS
    return st.one_of(st.sampled_from(pool or ["x"]), st.sampled_from(SPECIAL), base)


# ----------------------------------------------------------------------------- oracle: is a value acceptable?

def _int(v, lo=None, hi=None):
    try:
        n = int(v.strip())
    except ValueError:
        return False
    return (lo is None or n >= lo) and (hi is None or n <= hi)


def _float(v, lo=None, hi=None, lo_open=False, hi_open=False):
    try:
        f = float(v)
    except ValueError:
        return False
    if not math.isfinite(f):
        return False
    return (lo is None or (f > lo if lo_open else f >= lo)) and (hi is None or (f < hi if hi_open else f <= hi))


def _file(v):
    return Path(v).is_file() if v and "\x00" not in v else False


DTYPES = {"auto", "bf16", "fp16", "fp32", "float32", "bfloat16", "float16"}
DEVICES = {"auto", "cpu", "mps"}
COMMON = {"--device": lambda v: v in DEVICES, "--dtype": lambda v: v in DTYPES}
PRUNE = {"--prune-heads": lambda v: _float(v, 0, 1, True, True), "--sparsity": lambda v: _float(v, 0, 1, True, True),
         "--low-rank": lambda v: _float(v, 0, 1, True), "--sparsity-method": lambda v: v in ("magnitude", "wanda"),
         "--sparsity-pattern": lambda v: v in ("unstructured", "2:4"), "--calib-samples": lambda v: _int(v, 1),
         "--calib-text": _file}
ORACLE = {
    "compress": {**COMMON, **PRUNE, "--bits": lambda v: v.strip() in ("4", "8"), "--scheme": lambda v: v == "w4",
                 "--group-size": lambda v: _int(v) and int(v) in (32, 64, 128),
                 "--include": lambda v: bool(v) and "\x00" not in v, "--exclude": lambda v: bool(v) and "\x00" not in v,
                 "--observer": lambda v: v in ("minmax", "percentile")},
    "prune": {**COMMON, **PRUNE},
    "eval": {**COMMON, "--max-tokens": lambda v: _int(v, 0) and int(v) != 1, "--seq-len": lambda v: _int(v, 2),
             "--batch-size": lambda v: _int(v, 1), "--text": _file, "--kv-bits": lambda v: v.strip() in ("2", "4", "8"),
             "--kv-chunk": lambda v: _int(v, 1)},
    "generate": {**COMMON, "--max-new-tokens": lambda v: _int(v, 1, 100000), "--temperature": lambda v: _float(v, 1e-4),
                 "--top-p": lambda v: _float(v, 0, 1), "--seed": lambda v: _int(v, -(2**63), 2**64 - 1),
                 "--kv-bits": lambda v: v.strip() in ("2", "4", "8")},
    "train": {"--device": lambda v: v in DEVICES, "--steps": lambda v: _int(v, 1),
              "--global-batch": lambda v: _int(v, 1, 2**20) and 8 % min(int(v), 8) == 0 or False,
              "--micro-batch": lambda v: _int(v, 1) and 8 % int(v) == 0, "--seq": lambda v: _int(v, 2),
              "--lr": lambda v: _float(v, 0, lo_open=True), "--warmup": lambda v: _int(v, 0),
              "--amp": lambda v: v in ("bf16", "none"), "--eval-every": lambda v: _int(v, 0),
              "--save-every": lambda v: _int(v, 0), "--eval-text": _file, "--text": _file},
}
# --global-batch alone: any valid integer is fine (the micro-batch defaults to it)
ORACLE["train"]["--global-batch"] = lambda v: _int(v, 1, 2**20)

EXPENSIVE = {"compress": ["--out", "{out}", "--bits", "4"], "prune": ["--out", "{out}", "--sparsity", "0.5"],
             "eval": [], "generate": ["hi"], "train": ["--text", "{text}", "--out", "{out}"]}
CHEAP = {"info": [], "estimate": [], "plan-train": []}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the fuzzed options may name; the working folder is a scratch folder meanwhile, so relative paths
    drawn by the fuzzer (``--json nan``) land there and not in the checkout."""
    d = tmp_path_factory.mktemp("cli-fuzz")
    old_cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    (d / "text.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "folder").mkdir()
    yield {"text": d / "text.txt", "binary": d / "binary.txt", "folder": d / "folder", "out": d / "out"}
    os.chdir(old_cwd)


def _message_names(err: str, opt: str, value: str) -> bool:
    names = {opt, opt.lstrip("-"), opt.lstrip("-").replace("-", "_")}
    needles = [n for n in names if n] + ([value, repr(value)] if value.strip() else [repr(value)])
    return any(n in err for n in needles) or "Usage:" in err or "No such option" in err


def _run(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.err.replace("\n", " ")


def _fuzz_one(command, data, files, capsys, model):
    opts = _options(command)
    names = data.draw(st.lists(st.sampled_from(sorted(opts)), min_size=1, max_size=2, unique=True), label="options")
    argv, chosen = [command, model], []
    base = (EXPENSIVE.get(command) or CHEAP.get(command) or [])
    argv += [a.format(out=files["out"], text=files["text"]) for a in base]
    for name in names:
        p = opts[name]
        if p.is_flag:
            argv.append(data.draw(st.sampled_from([name] + list(p.secondary_opts)), label=name))
            continue
        v = data.draw(values_for(name, p, files), label=name)
        argv += [name, v]
        chosen.append((name, v))
    with case("bad_input", f"cli {command}"):
        code, err = _run(argv, capsys)
        assert "Traceback" not in err, err
        assert code in (0, 2), f"{argv}: exit {code} (an internal failure, not a usage error): {err}"
        if code == 2:
            assert err.strip(), f"{argv}: exit 2 without a message"
            reached_model = MISSING in err
            if not reached_model and chosen:
                assert any(_message_names(err, n, v) for n, v in chosen) or "nothing to do" in err, \
                    f"{argv}: the message names neither option nor value: {err}"
            oracle = ORACLE.get(command, {})
            for n, v in chosen:
                ok = oracle.get(n)
                if command == "train" and n == "--amp" and "--budget" in argv:
                    ok = None  # the planner chooses amp under --budget (--amp is documented as "without --budget")
                if reached_model and ok is not None:
                    assert ok(v), f"{argv}: bad value {n} {v!r} was not refused before loading the model: {err}"
        out = files["out"]
        assert not out.exists() or command in CHEAP, f"{argv}: wrote {out} although it failed"
        assert not [x for x in leftovers(out.parent, set()) if x.startswith(".out.")]


@pytest.mark.parametrize("command", sorted(EXPENSIVE))
@fuzz_settings(60, deadline_ms=20000)
@given(data=st.data())
def test_cli_options_are_checked_before_loading(command, data, files, capsys):
    _fuzz_one(command, data, files, capsys, MISSING)


@pytest.mark.parametrize("command", sorted(CHEAP))
@fuzz_settings(30, deadline_ms=20000)
@given(data=st.data())
def test_cli_cheap_commands_on_a_real_model(command, data, files, capsys, tiny_llama_dir):
    _fuzz_one(command, data, files, capsys, str(tiny_llama_dir))


@pytest.mark.parametrize("argv", [
    ["--no-such-option"], ["info"], ["info", MISSING], ["compress", MISSING], ["nosuchcommand"],
    ["estimate", MISSING, "--json", "/nonexistent-dir/e.json"],
], ids=lambda a: " ".join(a)[:40])
def test_cli_usage_errors(argv, capsys):
    with case("bad_input", "cli usage"):
        code, err = _run(argv, capsys)
        assert code == 2 and err.strip() and "Traceback" not in err, (code, err)
