"""Shared fixtures: one tiny random-config Llama (GQA) and the bundled tokenizer.

The tiny model uses the bundled tokenizer's vocabulary (8192) so it works with the CLI and the
evaluation helpers; everything else is small so tests run in seconds on a 2-core CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


# ----------------------------------------------------------------------------- one tiny model per family
# kvpress-style: every capability's family tests run over this table (tests/test_families.py). Each model is
# tiny (2 layers, hidden 128, 8 query heads; GQA with 2 KV heads where the family has it) and uses the bundled
# tokenizer's vocabulary. Mistral without a sliding window (as Mistral v0.2+), so the compressed KV caches apply.
_COMMON = dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=0, pad_token_id=1)
FAMILIES = {
    "llama": dict(model_type="llama", **_COMMON),
    "mistral": dict(model_type="mistral", sliding_window=None, **_COMMON),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False, **_COMMON),
    "qwen3": dict(model_type="qwen3", use_sliding_window=False, **_COMMON),
    "gemma": dict(model_type="gemma", **_COMMON),
    "phi3": dict(model_type="phi3", **_COMMON),
    "gpt2": dict(model_type="gpt2", vocab_size=8192, n_embd=128, n_layer=2, n_head=8, n_inner=256, n_positions=512,
                 embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                 tie_word_embeddings=False),
}


# Mixture-of-experts families as transformers 5 ships them (fused 3-D experts, see openautoglm._hf.moe): 4 experts,
# top-2, expert width 128 (a multiple of the w4 group), hidden 128. DeepSeek-V3: multi-head latent attention, one
# shared expert, layer 0 dense; GPT-OSS: transposed, interleaved gate_up with biases, attention sinks, a sliding layer.
_MOE = dict(_COMMON, intermediate_size=128)
MOE_FAMILIES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **_MOE),
    "qwen3_moe": dict(model_type="qwen3_moe", moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, use_sliding_window=False, **_MOE),
    "olmoe": dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, **_MOE),
    "qwen2_moe": dict(model_type="qwen2_moe", moe_intermediate_size=128, shared_expert_intermediate_size=256,
                      num_experts=4, num_experts_per_tok=2, use_sliding_window=False, **_MOE),
    "deepseek_v3": dict(model_type="deepseek_v3", **{**_MOE, "num_key_value_heads": 8, "intermediate_size": 256},
                        moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=128, q_lora_rank=128,
                        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2, sliding_window=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_MOE),
}
for _d in MOE_FAMILIES.values():
    _d.pop("head_dim") if _d["model_type"] == "deepseek_v3" else None
ALL_FAMILIES = {**FAMILIES, **MOE_FAMILIES}


def make_tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny causal LM of ``family`` (a key of :data:`FAMILIES` or :data:`MOE_FAMILIES`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**{**ALL_FAMILIES[family], **overrides})
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    """Parametrizes a test over every supported family (use with :func:`make_tiny`)."""
    return request.param


@pytest.fixture(params=sorted(MOE_FAMILIES))
def moe_family(request) -> str:
    """Parametrizes a test over every mixture-of-experts family (use with :func:`make_tiny`)."""
    return request.param


def run_interpreted(script: str) -> None:
    """Run ``script`` in a fresh Python under Triton's CPU interpreter (``TRITON_INTERPRET=1`` must be set before
    triton is imported); it passes by printing ``OK``. Skips where triton is missing or its interpreter cannot run
    with this numpy."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    probe = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True)
    if probe.returncode:
        pytest.skip("triton is not installed")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if "only 0-dimensional arrays" in r.stderr:
        pytest.skip("this numpy is too new for triton's interpreter")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def sm90_tool():
    """:mod:`openautoglm.kv.kernels.sass` (sm_90 compiles, registers and SASS through the cuobjdump of Triton's
    NVIDIA backend), or skip where this Triton cannot compile for sm_90."""
    pytest.importorskip("triton")
    try:
        from openautoglm.kv.kernels import sass
    except Exception as e:  # noqa: BLE001 - a triton without the NVIDIA backend
        pytest.skip(f"no sm_90 compile here: {e}")
    if not sass.available():
        pytest.skip("triton's NVIDIA backend has no cuobjdump")
    return sass
