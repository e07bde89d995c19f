"""The fast (Fisher) sensitivities of the budget search: predictions from one backward pass, a handful of
evaluations to calibrate them, the cache shared by the Python API and the CLI, and the time limit."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import _hf
from openautoglm.auto import compress_to_budget
from openautoglm.auto import sensitivity as S
from openautoglm.auto.fisher import fisher_signals
from openautoglm.auto.space import WEIGHT_OPTIONS, find_units
from openautoglm.memory import estimate_memory

OPTS = [WEIGHT_OPTIONS[n] for n in ("bf16", "w8", "w4g128", "w4g32")]
KV = [None, 8, 4, 2]


def _windows(n=4, seq=96, seed=0):
    return torch.randint(2, 8000, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_second_order_prediction_matches_a_small_perturbation():
    """For a small perturbation of one Linear's weight, the prediction (1/2 sum g^2 d^2 over its outputs) is on the
    scale of the measured curvature term, (L(W + D) + L(W - D)) / 2 - L(W) (the symmetric difference removes the
    first-order term, which the prediction leaves out on purpose)."""
    model = make_tiny_llama(0)
    units = find_units(model)
    w = _windows()
    name = units[1].modules[-1]
    lin = model.get_submodule(name)

    def nll():
        return float(S.nll(model, w))

    base = nll()
    delta = 0.02 * lin.weight.detach().abs().mean() * torch.randn_like(lin.weight, generator=None)
    with torch.no_grad():
        lin.weight += delta
        up = nll()
        lin.weight -= 2 * delta
        down = nll()
        lin.weight += delta
    curvature = (up + down) / 2 - base
    # the same perturbation as an "option": a module whose output differs by x @ delta^T

    class Perturbed(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return torch.nn.functional.linear(x, self.lin.weight + delta, self.lin.bias)

    from openautoglm.auto import fisher as FI

    fp = FI.FisherPass(model, [units[1]], [OPTS[0], WEIGHT_OPTIONS["w8"]], [None], [], [], kv_group=64,
                       kv_residual=0, seq_len=w.shape[1], n_windows=w.shape[0])
    fp._qmods[(name, 1)] = Perturbed(lin)
    for other in units[1].modules[:-1]:
        fp._qmods[(other, 1)] = model.get_submodule(other)  # unchanged: zero contribution
    fp.run(w, batch_size=2)
    predicted = float(fp.acc.get(("w", 0, 1)).mean()) / (w.shape[1] - 1)
    assert curvature > 0 and 0.2 < predicted / curvature < 5, (predicted, curvature)


def test_fisher_signals_are_ordered_and_cheap():
    """w4 costs more than w8, 2-bit KV more than 8-bit (per layer, before any calibration), and the method spends
    a handful of evaluations where measuring spends one per unit x option, layer x width and layer x group."""
    model = make_tiny_llama(0)
    units, w = find_units(model), _windows(n=4, seq=128)
    base, weight, _, kv, _, _, _ = fisher_signals(model, w, units, OPTS, KV, [], [], kv_group=32, kv_residual=0,
                                                  progress=False)
    assert base > 0
    for row in weight:
        assert row[0] == 0.0 and 0 < row[1] < row[2]
    assert sum(r[3] > r[1] for r in kv) == len(kv)
    fast = S.measure(model, w, units, OPTS, KV, [0.0, 0.5], kv_group=32, kv_residual=0, use_cache=False,
                     progress=False, method="fisher")
    slow_evals = 1 + len(units) * (len(OPTS) - 1) + len(kv) * 3
    assert fast.signal == "fisher" and fast.evaluations <= 1 + 2 + 1 + 3 * 2 < slow_evals
    assert set(fast.scales) >= {"w8", "w4", "kv"}
    # the layers whose pruning cost is refined carry measured costs: equal to the measured method's
    slow = S.measure(model, w, units, OPTS[:2], [None], [0.0, 0.5], kv_group=32, kv_residual=0, use_cache=False,
                     progress=False, method="measured")
    refined = [int(k.rsplit(" ", 1)[1]) for k in fast.scales if k.startswith("prune layer")]
    assert refined
    for layer in refined:
        assert fast.layer_prune[layer] == pytest.approx(slow.layer_prune[layer], abs=1e-9)


def test_fingerprint_ignores_how_the_model_was_loaded():
    """The sensitivity cache key does not change with the load dtype or path (API and CLI share the cache)."""
    bf = make_tiny_llama(0, torch.bfloat16)
    fp32 = copy.deepcopy(bf).to(torch.float32)
    fp32.config._name_or_path = "/elsewhere/model"
    fp32.config.dtype = torch.float32
    assert S.tensor_fingerprint(bf) == S.tensor_fingerprint(fp32)
    other = make_tiny_llama(1, torch.bfloat16)
    assert S.tensor_fingerprint(other) != S.tensor_fingerprint(bf)


def test_time_limit_returns_the_best_verified_recipe(tokenizer, tmp_path):
    model = make_tiny_llama(0, tie_word_embeddings=True)
    budget = int(0.85 * estimate_memory(model, batch=2, seq_len=128, device="cpu").total)
    r = compress_to_budget(model, budget, tokenizer=tokenizer, context=128, batch=2, schemes=("bf16", "w8", "w4g128"),
                           kv_bits=(None, 4), prune_ratios=(), calib_tokens=128, verify_tokens=256, eval_tokens=256,
                           top_k=4, progress=False, cache_dir=tmp_path, time_limit=1e-3)
    assert len(r.shortlist) <= 2 and all(c.measured is not None for c in r.shortlist)
    assert any("time limit" in n for n in r.notes) and not r.quality and r.measured is None
    assert r.pick.bytes <= budget and len(_hf.decoder_layers(model)) == 4
    s = r.summary()
    assert s["sensitivity"]["signal"] == "fisher" and s["verified_perplexity_change"] is not None
