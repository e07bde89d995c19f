"""compress_to_budget on the tiny Llama: the pick respects the budget (estimator and measurement), its recipe
replays to identical weights (Python and CLI) and is recorded in config.json, the report renders, infeasible and
bad budgets give clear errors. One search runs for the whole module (``auto_run``); the rest reuse its cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import hub
from openautoglm.auto import (
    BudgetError,
    apply_recipe,
    compress_to_budget,
    load_recipe,
    parse_budget,
    save_recipe,
)
from openautoglm.cli import main
from openautoglm.memory import estimate_memory, model_bytes

SETTINGS = dict(context=128, batch=2, schemes=("bf16", "w8", "w4g128"), kv_bits=(None, 4, 2), prune_ratios=(0.5,),
                calib_tokens=128, verify_tokens=256, eval_tokens=256, n_prompts=1, new_tokens=8, top_k=3, progress=False)


def tiny(seed: int = 0):
    """The tiny Llama with tied embeddings (as the bundled model): the decoder layers are most of its bytes."""
    return make_tiny_llama(seed, tie_word_embeddings=True)


def tiny_budget(fraction: float) -> int:
    return int(fraction * estimate_memory(tiny(), batch=2, seq_len=128, device="cpu").total)


@pytest.fixture(scope="module")
def sens_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sensitivity-cache")


@pytest.fixture(scope="module")
def auto_run(tokenizer, sens_cache):
    """(model compressed in place, AutoResult, budget) at 85% of the tiny model's inference estimate."""
    model = tiny()
    budget = tiny_budget(0.85)
    result = compress_to_budget(model, budget, tokenizer=tokenizer, cache_dir=sens_cache, **SETTINGS)
    return model, result, budget


def test_pick_fits_by_estimate_and_by_measurement(auto_run):
    model, r, budget = auto_run
    assert r.pick.bytes <= r.fit <= budget
    est = estimate_memory(model, batch=2, seq_len=128, device="cpu", kv_dtype=[r.kv_options[b] for b in r.pick.kv])
    assert abs(est.total - r.pick.bytes) <= 64          # the search's byte tables are the estimator's figures
    assert r.measured["peak"] <= budget                 # CPU: live tensor bytes of a real prefill + decode
    assert r.measured["kv_cache"] == est.terms["kv_cache"]  # the real cache (window sized to the context) = estimate
    assert r.measured["weights"] == model_bytes(model) < r.estimate_before.terms["weights"]
    assert r.pick.measured is not None and r.pick in r.shortlist   # verified together on calibration text


def test_quality_figures_are_measured(auto_run):
    _, r, _ = auto_run
    q = r.quality
    assert q["perplexity"] > 1 and q["perplexity_original"] > 1
    assert math.isclose(q["perplexity_increase"], q["perplexity"] / q["perplexity_original"] - 1)
    assert 0 <= q["bleu4"] <= 100 and len(q["generations"]) == 1
    assert -1 <= q["attention_cosine"]["mean"] <= 1 and q["attention_cosine"]["rows"] > 0
    verified_uniform = [c for c in r.shortlist if c.kind == "uniform"]
    assert verified_uniform and r.pick.measured <= min(c.measured for c in verified_uniform)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_recipe_replays_identical_weights(auto_run, tmp_path, tokenizer, capsys):
    model, r, _ = auto_run
    path = save_recipe(r.recipe, tmp_path / "recipe.json")
    fresh = tiny()
    kv = apply_recipe(fresh, load_recipe(path))
    assert kv == r.kv_config
    _same(fresh.state_dict(), model.state_dict())
    # saved: config.json records the recipe and the KV cache; it reloads, and --recipe DIR replays it
    hub.save_pretrained(model, tmp_path / "auto", tokenizer=tokenizer)
    kinds = [t["type"] for t in json.loads((tmp_path / "auto" / "config.json").read_text())["openautoglm"]["transforms"]]
    assert "recipe" in kinds and ("kv_cache" in kinds) == (kv is not None)
    back = hub.from_pretrained(tmp_path / "auto")
    _same(back.state_dict(), model.state_dict())
    assert getattr(back, "kv_cache_config", None) == kv
    assert load_recipe(tmp_path / "auto") == r.recipe
    hub.save_pretrained(tiny(), tmp_path / "orig", tokenizer=tokenizer)
    code = main(["compress", str(tmp_path / "orig"), "--recipe", str(tmp_path / "auto"), "--out", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err
    _same(hub.from_pretrained(tmp_path / "cli").state_dict(), model.state_dict())


def test_report_renders(auto_run, tmp_path):
    _, r, _ = auto_run
    md = r.write_report(tmp_path / "rep")
    html = (tmp_path / "rep" / "report.html").read_text()
    for name in ("memory.png", "pareto.png", "bits.png"):
        png = tmp_path / "rep" / name
        assert png.stat().st_size > 2000 and png.read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in md.read_text()
    assert html.count("data:image/png;base64,") == 3 and "held-out perplexity" in html
    assert json.loads(json.dumps(r.to_dict(), default=str))["pick"] == r.describe(r.pick)


def test_infeasible_budget_names_the_smallest(auto_run, tokenizer, sens_cache):
    model = tiny()  # same weights and calibration: its sensitivities come from the disk cache
    with pytest.raises(BudgetError, match=r"nothing fits in .* the smallest recipe of the search space needs") as e:
        compress_to_budget(model, tiny_budget(0.2), tokenizer=tokenizer, cache_dir=sens_cache, **SETTINGS)
    assert "perplexity" in str(e.value) and e.value.smallest_perplexity > 1
    assert tiny_budget(0.2) < e.value.smallest < tiny_budget(1.0)


@pytest.mark.parametrize("bad, kind, match", [
    ("12 GB?", ValueError, "cannot read the budget"), ("-1GiB", ValueError, "negative"), ("0", ValueError, "zero"),
    (0, ValueError, "zero"), (-5, ValueError, "negative"), ("lots", ValueError, "cannot read"),
    (float("nan"), ValueError, "finite"), (True, TypeError, "size string"), (None, TypeError, "size string"),
])
def test_bad_budgets(bad, kind, match):
    with pytest.raises(kind, match=match):
        parse_budget(bad)


def test_auto_budget_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        parse_budget("auto")
    assert parse_budget("1.5 GiB") == 3 * 2**29 and parse_budget(4096) == 4096


def test_bad_arguments_fail_before_any_work(tokenizer):
    model = tiny()
    for kw, match in ((dict(context=0), "context"), (dict(context=128, batch=True), "batch"),
                      (dict(context=128, schemes=("w3",)), "unknown weight options"),
                      (dict(context=128, kv_bits=(3,)), "kv_bits"), (dict(context=128, prune_ratios=(1.0,)), "prune"),
                      (dict(context=128, budget_terms=("weights", "flops")), "budget_terms"),
                      (dict(context=128, headroom=0.9), "headroom")):
        with pytest.raises(ValueError, match=match):
            compress_to_budget(model, "1GiB", tokenizer=tokenizer, **kw)


def test_cli_budget_errors(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "x")
    cases = [(["--budget", "12 GB?", "--context", "128"], "cannot read the budget '12 GB?'"),
             (["--budget", "0", "--context", "128"], "zero"), (["--budget", "1GiB"], "--context"),
             (["--budget", "1GiB", "--context", "64", "--bits", "4"], "drop --bits"),
             (["--budget", "1GiB", "--recipe", "r.json", "--context", "64"], "not both"),
             (["--budget", "1GiB", "--context", "64", "--search-kv-bits", "3"], "--search-kv-bits: '3'"),
             (["--budget", "1GiB", "--context", "64", "--search-schemes", "w3"], "unknown weight options"),
             (["--budget", "1GiB", "--context", "64", "--search-prune", "half"], "--search-prune 'half'")]
    for args, needle in cases:
        code = main(["compress", str(tiny_llama_dir), *args, "--out", out])
        assert code == 2 and needle in capsys.readouterr().err
    code = main(["compress", str(tiny_llama_dir), "--budget", "1GiB", "--context", "64", "--out", str(tiny_llama_dir)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err      # refused before loading, not clobbered
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["compress", str(tiny_llama_dir), "--budget", "auto", "--context", "64", "--out", out])
    assert code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_verification_masks_the_heads_of_quantized_projections():
    from openautoglm.auto.api import _applied
    from openautoglm.auto.search import Candidate
    from openautoglm.auto.sensitivity import nll, swapped
    from openautoglm.auto.space import WEIGHT_OPTIONS, find_units
    from openautoglm.prune.heads import mask_heads

    model = tiny()
    ids = torch.randint(2, 8192, (1, 64), generator=torch.Generator().manual_seed(0))
    units, options = find_units(model), [WEIGHT_OPTIONS["bf16"], WEIGHT_OPTIONS["w8"]]
    removed = {1: [0, 1, 2, 3], 2: [4, 5, 6, 7]}
    c = Candidate(0.5, (1,) * len(units), (0,) * 4, 0, 0.0)
    with _applied(model, c, units, options, removed):
        both = nll(model, ids)
    with swapped(model, {n: options[1] for u in units for n in u.modules}):
        quant_only = nll(model, ids)
    with mask_heads(model, removed):
        mask_only = nll(model, ids)
    assert abs(both - quant_only) > 0.5 * abs(mask_only - nll(model, ids)) > 0


def test_cli_budget_end_to_end(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """``compress --budget`` (a small search space, no report: test_report_renders covers it): the model,
    recipe.json and auto_result.json; the pick fits; the recipe replays from the folder."""
    monkeypatch.setenv("OPENAUTOGLM_CACHE", str(tmp_path / "cache"))
    budget = int(0.95 * estimate_memory(hub.from_pretrained(tiny_llama_dir), batch=2, seq_len=128, device="cpu").total)
    out = tmp_path / "auto"
    code = main(["compress", str(tiny_llama_dir), "--budget", str(budget), "--context", "128", "--batch", "2",
                 "--calib-tokens", "128", "--verify-tokens", "128", "--eval-tokens", "256", "--search-schemes", "w8", "--search-kv-bits", "4",
                 "--search-prune", "0", "--no-report", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for name in ("config.json", "model.safetensors", "recipe.json", "auto_result.json"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "report.md").exists()
    res = json.loads((out / "auto_result.json").read_text())
    assert res["estimated_bytes"] <= budget and set(res["pick_detail"]["weights"]) <= {"bf16", "w8"}
    assert load_recipe(out) == load_recipe(out / "recipe.json") == res["recipe"]


@pytest.mark.parametrize("bits", [4, (8, 2, None, 4)])
def test_measured_kv_is_the_estimate_with_the_auto_window(bits):
    """measure_memory builds the cache for the served context ("auto" window: none at 256 tokens), as the
    estimator sizes it; a cache built without the context would keep a 128-token bf16 window."""
    from openautoglm.auto.quality import measure_memory
    from openautoglm.kv import KVCacheConfig

    model = tiny()
    kv = KVCacheConfig(bits=bits)
    m = measure_memory(model, kv, batch=2, context=256, decode_steps=2)
    per_layer = [bits] * 4 if isinstance(bits, int) else list(bits)
    est = estimate_memory(model, batch=2, seq_len=256, device="cpu",
                          kv_dtype=["bf16" if b is None else f"int{b}" for b in per_layer])
    assert m["kv_cache"] == est.terms["kv_cache"]
