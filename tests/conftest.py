"""Shared fixtures: one tiny random-config Llama (GQA) and the bundled tokenizer.

The tiny model uses the bundled tokenizer's vocabulary (8192) so it works with the CLI and the
evaluation helpers; everything else is small so tests run in seconds on a 2-core CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "openautoglm" / "models" / "open-autoglm-base"

TINY_LLAMA = dict(
    vocab_size=8192,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny LlamaForCausalLM (8 query heads, 2 KV heads, 4 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama folder (safetensors + tokenizer), shared read-only by the session."""
    from openautoglm import hub

    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    hub.save_pretrained(make_tiny_llama(), out, tokenizer=tokenizer)
    return out


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(2, 8192, (2, 24), generator=g)
