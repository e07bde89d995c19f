"""Quality measurements: held-out perplexity and BLEU-4 of generations against a baseline model.

Perplexity is computed on non-overlapping windows of ``seq_len`` tokens of the bundled held-out text
(Python documentation files never seen in training; see ``scripts/build_corpus.py``) or of user text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

HELDOUT_PATH = Path(__file__).resolve().parent / "data" / "heldout.txt"
DOC_SEPARATOR = "<|endoftext|>"


def load_heldout_text() -> str:
    """The bundled held-out text (about 0.5 MB of reST, documents separated by ``<|endoftext|>``)."""
    return HELDOUT_PATH.read_text("utf-8")


def heldout_token_ids(tokenizer, text: str | None = None) -> torch.Tensor:
    """Token ids of ``text`` (default: the bundled held-out text), shape ``(n_tokens,)``."""
    text = load_heldout_text() if text is None else text
    if not isinstance(text, str) or not text.strip():
        raise ValueError("evaluation text is empty; pass non-empty text or use the bundled held-out text")
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def _max_positions(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def token_windows(tokenizer, text: str | None = None, *, token_ids: torch.Tensor | None = None,
                  max_tokens: int | None = None, seq_len: int = 512) -> torch.Tensor:
    """Non-overlapping windows of ``text`` (default: the held-out text), shape ``(n_windows, seq_len)``."""
    ids = token_ids if token_ids is not None else heldout_token_ids(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_win = ids.numel() // seq_len
    if n_win == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n_win * seq_len].view(n_win, seq_len)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer=None,
    text: str | None = None,
    *,
    token_ids: torch.Tensor | None = None,
    max_tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: the bundled held-out text).

    The text is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens; each window
    predicts its ``seq_len - 1`` next tokens. ``max_tokens`` bounds the tokens read (at least one window).
    """
    if seq_len < 2 or seq_len > _max_positions(model):
        raise ValueError(f"seq_len={seq_len} must be in [2, {_max_positions(model)}] (the model's context)")
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"max_tokens={max_tokens} must be at least seq_len={seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    windows = token_windows(tokenizer, text, token_ids=token_ids, max_tokens=max_tokens, seq_len=seq_len)
    n_win = windows.shape[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in tqdm(range(0, n_win, batch_size), desc="perplexity", unit="batch", disable=not progress):
            x = windows[i : i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            tgt = x[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), reduction="sum").item()
            count += tgt.numel()
    finally:
        model.train(was_training)
    mean = nll / count
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=count, seq_len=seq_len)


def heldout_prompts(tokenizer, n: int = 8, prompt_tokens: int = 32) -> list[str]:
    """``n`` prompts: the first ``prompt_tokens`` tokens of the first ``n`` held-out documents."""
    docs = [d.strip() for d in load_heldout_text().split(DOC_SEPARATOR) if len(d.strip()) > 200]
    if n > len(docs):
        raise ValueError(f"n={n} prompts requested; the held-out text has {len(docs)} documents")
    out = []
    for d in docs[:n]:
        ids = tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"][:prompt_tokens]
        out.append(tokenizer.decode(ids))
    return out


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 128, **gen_kwargs) -> list[str]:
    """Greedy continuations (text after the prompt) of each prompt, one at a time (no padding effects)."""
    device = next(model.parameters()).device
    outs = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        gen = model.generate(
            ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, **gen_kwargs,
        )
        outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def bleu_vs_baseline(candidates: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, 0-100) of ``candidates`` against the baseline model's ``references``."""
    import sacrebleu

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    # sacrebleu's float arithmetic can return 100.00000000000004 for identical text: the scale is 0-100
    return min(100.0, max(0.0, float(sacrebleu.corpus_bleu(candidates, [references]).score)))
