"""The `openautoglm` command: info / eval / generate and its exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from openautoglm.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_bundled(capsys):
    code, out, err = run(["info", "open-autoglm-base", "--batch", "2", "--context", "4096"], capsys)
    assert code == 0, err
    for needle in ("LlamaForCausalLM", "16 / 4", "KV cache per 1k tokens", "batch 2 x context 4096", "weights"):
        assert needle in out


def test_eval_tiny_folder_json(tiny_llama_dir, tmp_path, capsys):
    js = tmp_path / "ppl.json"
    code, out, err = run(["eval", str(tiny_llama_dir), "--max-tokens", "256", "--seq-len", "128", "--json", str(js)], capsys)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["tokens"] == 2 * 127 and res["perplexity"] > 1


def test_generate_tiny_folder(tiny_llama_dir, capsys):
    code, out, err = run(["generate", str(tiny_llama_dir), "Hello", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert out.startswith("Hello")


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["info", "no-such-model"], 2, "unknown model 'no-such-model'"),
        (["info", "open-autoglm-base", "--kv-dtype", "int3"], 2, "--kv-dtype 'int3'"),
        (["eval", "open-autoglm-base", "--bogus"], 2, "No such option"),
        (["eval", "open-autoglm-base", "--device", "tpu"], 2, "unknown device 'tpu'"),
        (["generate", "open-autoglm-base", ""], 2, "PROMPT is empty"),
        ([], 2, "Usage"),
    ],
)
def test_bad_usage_exits_2_without_traceback(argv, code, message, capsys):
    got, out, err = run(argv, capsys)
    assert got == code
    assert message in out + err
    assert "Traceback" not in out + err


def test_failure_exits_1(tiny_llama_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    got, out, err = run(["eval", str(d)], capsys)
    assert got == 1
    assert "model.safetensors" in err and "Traceback" not in err


def test_debug_shows_traceback():
    p = subprocess.run([sys.executable, "-m", "openautoglm", "--debug", "info", "no-such-model"], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_console_script_exit_code():
    p = subprocess.run([sys.executable, "-m", "openautoglm", "info", "no-such-model"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown model" in p.stderr and "Traceback" not in p.stderr


def test_info_pruned_and_quantized_counts_logical_parameters(tmp_path, capsys):
    from conftest import make_tiny_llama

    from openautoglm import DynamicQuantizer, hub
    from openautoglm.prune.heads import HeadPruner

    m = make_tiny_llama()
    HeadPruner(importance="magnitude", ratio=0.25, scope="global").prune(m)
    pruned = sum(p.numel() for p in m.parameters())  # the tiny model has untied embeddings
    DynamicQuantizer.quantize(m, bits=8)
    hub.save_pretrained(m, tmp_path / "pq")
    code, out, err = run(["info", str(tmp_path / "pq")], capsys)
    assert code == 0, err
    assert f"{pruned:,}" in out
    assert "prune_heads, quantize" in out
    assert "per layer q" in out or "6 / 2" in out
