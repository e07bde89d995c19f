"""Calibrated cross-layer sharing: the search, the shared cache it builds, bytes saved, composition with INT4."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import _hf
from openautoglm.kv import KVCacheConfig, QuantizedKVCache, search_sharing
from openautoglm.kv.metrics import cached_perplexity
from openautoglm.kv.share_search import _valid, calibration_loss


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_hidden_layers=4)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(2, 8192, (512,), generator=torch.Generator().manual_seed(0))


def test_greedy_search_picks_valid_pairs(model, tokens):
    plan = search_sharing(model, tokens, 2, seq_len=64, n_windows=2, progress=False)
    assert len(plan.pairs) == 2 and plan.saved_fraction == 0.5
    srcs, dsts = {s for s, _ in plan.pairs}, {d for _, d in plan.pairs}
    assert all(s < d for s, d in plan.pairs) and not srcs & dsts and len(dsts) == 2
    assert plan.evaluations == 6 + sum(_valid(plan.pairs[:1], s, d) for d in range(4) for s in range(d))
    # the first pair is the cheapest single pair: no other single pair scores lower
    windows = tokens[:128].view(2, 64)
    first = calibration_loss(model, windows, {plan.pairs[0][1]: plan.pairs[0][0]})
    assert first == pytest.approx(plan.losses[0])
    others = [calibration_loss(model, windows, {d: s}) for d in range(4) for s in range(d)]
    assert first <= min(others) + 1e-9
    d = plan.to_dict()
    assert d["pairs"] == [list(p) for p in plan.pairs] and len(d["calibration_ppl_increase_pct"]) == 2


def test_kvsharer_order_and_tolerance(model, tokens):
    none = search_sharing(model, tokens, 2, strategy="kvsharer", seq_len=64, n_windows=2, tolerance=0.0, progress=False)
    assert none.pairs == [] or all(math.exp(x - none.base_loss) - 1 <= 0 for x in none.losses)
    order = search_sharing(model, tokens, 2, strategy="kvsharer", seq_len=64, n_windows=2, tolerance=float("inf"),
                           progress=False)
    assert len(order.pairs) == 2 and order.evaluations == 2


def test_search_loss_is_the_evaluated_perplexity(model, tokens):
    """The search scores a plan exactly as the shared cache is later evaluated (one window, one chunk)."""
    share = ((0, 2), (1, 3))
    loss = calibration_loss(model, tokens[:64].view(1, 64), {d: s for s, d in share})
    ppl = cached_perplexity(model, kv=KVCacheConfig(share_layers=share), token_ids=tokens[:65], seq_len=64,
                            chunk=64, batch_size=1, progress=False)
    assert math.log(ppl.perplexity) == pytest.approx(loss, rel=1e-5)


def _nbytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes() for layer in cache.layers)


@pytest.mark.parametrize("bits", [None, 4])
def test_shared_cache_saves_the_layers_bytes(model, bits):
    ids = torch.randint(2, 8192, (1, 96), generator=torch.Generator().manual_seed(1))
    sizes, outs = [], []
    for share in ((), ((0, 3),), ((0, 2), (1, 3))):
        cache = KVCacheConfig(bits=bits, group_size=16, residual_length=0, share_layers=share).build(model.config)
        with torch.no_grad():
            outs.append(_hf.generate_with_cache(model, ids, cache, max_new_tokens=3, do_sample=False, pad_token_id=1))
        sizes.append(_nbytes(cache))
    assert all(o.shape == (1, 99) for o in outs)
    assert sizes[1] == pytest.approx(sizes[0] * 3 / 4, rel=0.02)  # 4 -> 3 -> 2 layers keep a cache
    assert sizes[2] == pytest.approx(sizes[0] / 2, rel=0.02)


def test_bad_search_arguments(model, tokens):
    with pytest.raises(ValueError, match="strategy"):
        search_sharing(model, tokens, 1, strategy="random", progress=False)
    with pytest.raises(ValueError, match="n_shared"):
        search_sharing(model, tokens, 4, progress=False)
    with pytest.raises(ValueError, match="calibration tokens"):
        search_sharing(model, tokens[:100], 1, progress=False)
