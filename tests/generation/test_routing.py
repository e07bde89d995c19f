"""openautoglm.generation.routing: model.generate(cache_implementation="static") routed to the compiled decode gives
transformers' output (tokens, EOS padding, length), and every call it cannot serve exactly goes to transformers."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from conftest import make_tiny, make_tiny_llama
from transformers import LlamaForCausalLM, LogitsProcessorList, NoRepeatNGramLogitsProcessor

import openautoglm.generation.generator as G
from openautoglm.generation import enable_fast_generate
from openautoglm.generation.routing import ENV, RoutedGenerate, routed

STATIC = dict(cache_implementation="static", do_sample=False)


@pytest.fixture
def model():
    return enable_fast_generate(make_tiny_llama(), allow_cpu=True)


@pytest.fixture
def spies(monkeypatch):
    """Counts calls of the compiled decode (Generator.generate) and of transformers' own generate."""
    n = {"fast": 0, "hf": 0}
    fast, original = G.Generator.generate, RoutedGenerate.original

    def fast_spy(self, *a, **k):
        n["fast"] += 1
        return fast(self, *a, **k)

    def original_spy(self, model):
        n["hf"] += 1
        return original(self, model)

    monkeypatch.setattr(G.Generator, "generate", fast_spy)
    monkeypatch.setattr(RoutedGenerate, "original", original_spy)
    return n


def _ids(batch, prompt=24, seed=1234):
    return torch.randint(2, 8192, (batch, prompt), generator=torch.Generator().manual_seed(seed))


def _hf(m, ids, **kw):
    """transformers' generate on the same model, routing bypassed."""
    return type(m).generate(m, ids, **kw)


def _first_new(m, ids, n=12):
    """The greedy continuation without EOS (the tiny config's EOS 0 held back): picks EOS ids for the tests."""
    return _hf(m, ids, max_new_tokens=n, min_new_tokens=n, **STATIC)[:, ids.shape[1]:]


def _eos_at(row: torch.Tensor, others: torch.Tensor, lo: int = 1) -> tuple[int, int]:
    """(token, index): the first token of ``row`` at index >= lo whose first occurrence is there and that is
    absent from ``others``."""
    for i in range(lo, len(row)):
        t = int(row[i])
        if t not in row[:i].tolist() and t not in others.tolist():
            return t, i
    pytest.skip("no usable EOS candidate in this greedy continuation")


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_match_transformers(model, spies, batch):
    ids = _ids(batch)
    out = model.generate(ids, max_new_tokens=10, **STATIC)
    assert spies == {"fast": 1, "hf": 0}
    ref = _hf(model, ids, max_new_tokens=10, **STATIC)
    assert out.dtype == torch.long and torch.equal(out, ref)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=10, **STATIC), ref)  # keyword input, reused state


def test_eos_in_one_row_pads_like_transformers(model, spies):
    ids = _ids(2)
    new = _first_new(model, ids)
    eos, i = _eos_at(new[0], new[1], lo=2)
    out = model.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=7, **STATIC)
    ref = _hf(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=7, **STATIC)
    assert spies["fast"] == 1 and torch.equal(out, ref) and out.shape == (2, 24 + 12)
    assert int(out[0, 24 + i]) == eos and bool((out[0, 25 + i:] == 7).all())
    # several EOS ids, pad unset (transformers pads with the first EOS)
    eos2 = [eos, 5] if 5 not in new.tolist() else [eos, 6]
    out = model.generate(ids, max_new_tokens=12, eos_token_id=eos2, pad_token_id=None, **STATIC)
    assert torch.equal(out, _hf(model, ids, max_new_tokens=12, eos_token_id=eos2, pad_token_id=None, **STATIC))
    assert bool((out[0, 25 + i:] == eos).all())


def test_all_rows_finish_early_with_transformers_length(model, spies):
    ids = _ids(2)
    new = _first_new(model, ids)
    e0, i0 = _eos_at(new[0], new[1], lo=1)
    e1, i1 = _eos_at(new[1], new[0], lo=1)
    kw = dict(max_new_tokens=12, eos_token_id=[e0, e1], **STATIC)
    out = model.generate(ids, **kw)
    assert spies["fast"] == 1
    assert torch.equal(out, _hf(model, ids, **kw)) and out.shape[1] == 24 + max(i0, i1) + 1 < 36


def test_min_new_tokens_and_min_length_hold_eos_back(model, spies):
    ids = _ids(2)
    new = _first_new(model, ids)
    eos = [int(new[0, 0]), int(new[1, 1])]  # both rows would stop at once
    for kw in (dict(min_new_tokens=5), dict(min_length=24 + 5), dict(min_new_tokens=1)):
        kw.update(max_new_tokens=12, eos_token_id=eos, **STATIC)
        out = model.generate(ids, **kw)
        assert torch.equal(out, _hf(model, ids, **kw)), kw
        m = kw.get("min_new_tokens", 5)
        assert not torch.isin(out[:, 24:24 + m], torch.tensor(eos)).any()
    assert spies["fast"] == 3
    # the helper itself: the same parameter
    res = G.Generator(model).generate(ids, 12, eos_token_id=eos, min_new_tokens=5)
    assert not torch.isin(res.tokens[:, 24:29], torch.tensor(eos)).any()
    with pytest.raises(ValueError, match="min_new_tokens"):
        G.Generator(model).generate(ids, 12, eos_token_id=eos, min_new_tokens=-1)


def test_max_length_instead_of_max_new_tokens(model, spies):
    ids = _ids(2, prompt=9)
    out = model.generate(ids, max_length=16, **STATIC)
    assert spies["fast"] == 1 and out.shape == (2, 16)
    assert torch.equal(out, _hf(model, ids, max_length=16, **STATIC))


def test_generation_config_static_and_sampling(model, spies):
    """cache_implementation set on the model's generation_config routes too; sampling gives ids in range."""
    model.generation_config.cache_implementation = "static"
    ids = _ids(2)
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    assert spies == {"fast": 1, "hf": 0}
    assert out.shape == (2, 32) and out.dtype == torch.long and torch.equal(out[:, :24], ids)
    assert bool(((out >= 0) & (out < 8192)).all())


@pytest.mark.parametrize("case", ["beams", "padding", "logits_processor", "return_dict", "no_static", "penalty",
                                  "cpu_not_allowed", "beyond_positions"])
def test_fallbacks_call_transformers(model, spies, case):
    ids = _ids(2)
    kw = dict(max_new_tokens=6, **STATIC)
    if case == "beams":
        kw["num_beams"] = 2
    elif case == "padding":
        kw["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.tensor([0, 1]), 0)
    elif case == "logits_processor":
        kw["logits_processor"] = LogitsProcessorList([NoRepeatNGramLogitsProcessor(2)])
    elif case == "return_dict":
        kw["return_dict_in_generate"] = True
    elif case == "no_static":
        kw.pop("cache_implementation")
    elif case == "penalty":
        kw["repetition_penalty"] = 1.3
    elif case == "cpu_not_allowed":
        enable_fast_generate(model)  # allow_cpu back to False
    elif case == "beyond_positions":  # transformers runs past the model's positions (with a warning); the helper cannot
        model.config.max_position_embeddings = 28
    out = model.generate(ids, **kw)
    assert spies == {"fast": 0, "hf": 1}
    ref = _hf(model, ids, **kw)
    if case == "return_dict":
        out, ref = out.sequences, ref.sequences
    assert torch.equal(out, ref)


def test_unsupported_family_falls_back_once(monkeypatch, caplog):
    m = enable_fast_generate(make_tiny("gpt2"), allow_cpu=True)
    built = []
    init = G.Generator.__init__
    monkeypatch.setattr(G.Generator, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    ids = _ids(1, prompt=5)
    with caplog.at_level(logging.DEBUG, logger="openautoglm.generation.routing"):
        for _ in range(2):
            out = m.generate(ids, max_new_tokens=4, **STATIC)
    assert len(built) == 1 and torch.equal(out, _hf(m, ids, max_new_tokens=4, **STATIC))
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "model_type 'gpt2'" in infos[0].getMessage()


def test_enable_disable_idempotent_and_copies(model, caplog):
    r = routed(model)
    assert isinstance(r, RoutedGenerate) and enable_fast_generate(model, allow_cpu=True) is model
    assert routed(model) is r and LlamaForCausalLM.generate is type(model).generate  # the class is untouched
    ids = _ids(1)
    with caplog.at_level(logging.INFO, logger="openautoglm.generation.routing"):
        a = model.generate(ids, max_new_tokens=5, **STATIC)
        model.generate(ids, max_new_tokens=5, **STATIC)
    assert sum("compiled static-cache decode" in x.getMessage() for x in caplog.records) == 1  # logged once
    gen = r._gen
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # rebound to the copy, state dropped
        assert routed(clone)._model() is clone and routed(clone)._gen is None
        assert torch.equal(clone.generate(ids, max_new_tokens=5, **STATIC), a)
    assert routed(model)._gen is gen
    enable_fast_generate(model, enabled=False)
    enable_fast_generate(model, enabled=False)
    assert "generate" not in vars(model) and routed(model) is None
    assert torch.equal(model.generate(ids, max_new_tokens=5, **STATIC), a)
    with pytest.raises(TypeError, match="generate"):
        enable_fast_generate(torch.nn.Linear(2, 2))


def test_model_change_rebuilds_the_generator(model):
    """A captured graph must never replay replaced weights: quantizing in place builds a new Generator."""
    from openautoglm.quant import QuantConfig, quantize

    ids = _ids(1, prompt=6)
    model.generate(ids, max_new_tokens=3, **STATIC)
    first = routed(model)._gen
    quantize(model, QuantConfig(scheme="w8", include=("*mlp*",)))
    out = model.generate(ids, max_new_tokens=3, **STATIC)
    assert routed(model)._gen is not first and torch.equal(out, _hf(model, ids, max_new_tokens=3, **STATIC))


def test_installed_by_quantize_and_from_pretrained_unless_opted_out(monkeypatch, tiny_llama_dir):
    from openautoglm import AutoModelForCausalLM, DynamicQuantizer
    from openautoglm.quant import QuantConfig, quantize

    m = make_tiny_llama()
    assert routed(m) is None
    quantize(m, QuantConfig(scheme="w4", group_size=32))
    assert routed(m) is not None and not routed(m).allow_cpu
    assert routed(DynamicQuantizer.quantize(make_tiny_llama(), bits=8)) is not None
    assert routed(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)) is not None
    off = enable_fast_generate(make_tiny_llama(), enabled=False)  # the user's choice survives quantize
    quantize(off, QuantConfig(scheme="w8"))
    assert routed(off) is None
    monkeypatch.setenv(ENV, "0")
    assert routed(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)) is None
    assert routed(DynamicQuantizer.quantize(make_tiny_llama(), bits=8)) is None


@pytest.mark.parametrize("routes", [True, False])
def test_transformers_warnings_logged_once_on_either_path(model, spies, routes):
    """Resolving the arguments runs transformers' preparation steps; their warnings come out once, on both paths."""
    if not routes:  # resolved in full, then sent to transformers (the helper cannot go past the positions)
        model.config.max_position_embeddings = 26
    seen = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    lg = logging.getLogger("transformers.generation.utils")
    level = lg.level
    lg.addHandler(handler)
    lg.setLevel(logging.WARNING)  # whatever verbosity earlier tests left transformers at
    try:  # batched, no attention mask, no pad token: transformers warns
        model.generate(_ids(2), max_new_tokens=3, pad_token_id=None, **STATIC)
    finally:
        lg.removeHandler(handler)
        lg.setLevel(level)
    assert spies["fast" if routes else "hf"] == 1
    assert sum("attention mask and the pad token id were not set" in m for m in seen) == 1
