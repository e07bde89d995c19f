"""``openautoglm eval/generate --kv-bits / --kv-share``: the compressed caches from the command line."""

from __future__ import annotations

import json

from openautoglm.cli import main


def test_generate_with_quantized_and_shared_cache(tiny_llama_dir, capsys):
    args = ["generate", str(tiny_llama_dir), "The quick brown fox jumps over the lazy dog. " * 6,
            "--max-new-tokens", "6", "--device", "cpu", "--kv-group-size", "16", "--kv-residual", "16"]
    assert main(args + ["--kv-bits", "4"]) == 0
    assert main(args + ["--kv-bits", "2", "--kv-share", "--kv-share-start", "2", "--kv-share-threshold", "-1"]) == 0
    assert main(args + ["--kv-bits", "8", "--kv-share-layers", "0:2,1:3", "--kv-residual", "auto"]) == 0
    assert "quick brown fox" in capsys.readouterr().out


def test_eval_reads_the_compressed_cache(tiny_llama_dir, tmp_path):
    out = tmp_path / "ppl.json"
    common = ["eval", str(tiny_llama_dir), "--max-tokens", "256", "--seq-len", "128", "--device", "cpu", "--dtype", "fp32"]
    assert main(common + ["--json", str(tmp_path / "ref.json")]) == 0
    assert main(common + ["--kv-bits", "2", "--kv-group-size", "16", "--kv-residual", "16", "--kv-chunk", "16",
                          "--kv-share-layers", "1:2", "--json", str(out)]) == 0
    got, ref = json.loads(out.read_text()), json.loads((tmp_path / "ref.json").read_text())
    assert got["kv_cache"]["bits"] == 2 and got["kv_cache"]["share_layers"] == [[1, 2]]
    assert got["tokens"] == ref["tokens"]
    assert got["perplexity"] != ref["perplexity"]  # the 2-bit cache was really read


def test_bad_kv_options_exit_2(tiny_llama_dir):
    base = ["generate", str(tiny_llama_dir), "hello", "--device", "cpu", "--max-new-tokens", "2"]
    assert main(base + ["--kv-bits", "3"]) == 2
    assert main(base + ["--kv-bits", "4", "--kv-group-size", "100"]) == 2
    assert main(base + ["--kv-share", "--kv-share-start", "9"]) == 2
    assert main(base + ["--kv-bits", "4", "--kv-residual", "many"]) == 2
    assert main(base + ["--kv-share-layers", "3:1"]) == 2
    assert main(base + ["--kv-share-layers", "x"]) == 2
