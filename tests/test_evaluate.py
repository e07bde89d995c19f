"""evaluate.py: perplexity windows, prompts and BLEU."""

from __future__ import annotations

import math

import pytest
import torch

from openautoglm.evaluate import bleu_vs_baseline, heldout_prompts, load_heldout_text, perplexity


def test_heldout_text_shipped():
    text = load_heldout_text()
    assert 100_000 < len(text) < 5_000_000 and "<|endoftext|>" in text


def test_perplexity_matches_manual_nll(tiny_llama, tokenizer):
    ids = torch.randint(2, 8192, (300,), generator=torch.Generator().manual_seed(0))
    res = perplexity(tiny_llama, token_ids=ids, seq_len=100, batch_size=2, progress=False)
    assert res.tokens == 3 * 99
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids[:300].view(3, 100)).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 8192), ids.view(3, 100)[:, 1:].reshape(-1))
    assert math.isclose(res.nll, nll.item(), rel_tol=1e-5)
    # a random model is about as good as uniform over the vocabulary
    assert 0.3 * 8192 < res.perplexity < 3 * 8192


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=1), "seq_len=1"),
    (dict(seq_len=100000), "seq_len=100000"),
    (dict(seq_len=64, max_tokens=10), "max_tokens=10"),
    (dict(seq_len=64, text="   "), "empty"),
])
def test_perplexity_bad_input(tiny_llama, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_llama, tokenizer, progress=False, **kwargs)


def test_bleu():
    refs = ["the quick brown fox jumps over the lazy dog today"] * 2
    assert bleu_vs_baseline(refs, refs) == pytest.approx(100.0)
    assert bleu_vs_baseline(["completely different words here now"] * 2, refs) < 10
    with pytest.raises(ValueError, match="2 references"):
        bleu_vs_baseline(["a"], refs)


def test_heldout_prompts(tokenizer):
    ps = heldout_prompts(tokenizer, n=3, prompt_tokens=16)
    assert len(ps) == 3 and all(len(tokenizer(p, add_special_tokens=False).input_ids) <= 17 for p in ps)
