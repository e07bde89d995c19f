"""Bad input, API side: property tests over every public config and verb argument.

Each example builds a config from a mix of accepted values and garbage (None, bools, huge/negative numbers,
NaN/Inf, strings, bytes, containers). The property: either a clear error (ValueError/TypeError/our own,
raised by openautoglm, naming the value or the field), or a valid config that round-trips through JSON
and works on a tiny model (finite logits). Never an exception from inside torch, never a hang (deadline).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from hypothesis import given
from hypothesis import strategies as st

from ._support import call_clean, case, fuzz_settings

pytestmark = pytest.mark.timeout(600)

GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.sampled_from([0, -1, 1, 2**63, -(2**31)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -0.0, 1e-300]),
    st.text(max_size=8), st.binary(max_size=4), st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


def field(*valid):
    """A field value: one of the accepted ``valid`` values or garbage (about half each)."""
    return st.one_of(st.sampled_from(valid), GARBAGE) if valid else GARBAGE


def kwargs_of(spec: dict) -> st.SearchStrategy[dict]:
    """Some of the fields of ``spec`` (name -> strategy), each maybe absent (its default)."""
    return st.fixed_dictionaries({}, optional=spec)


def _clean(fn, kw: dict, *extra_names, **kwargs):
    return call_clean(fn, names=[*kw, *extra_names], values=list(kw.values()), **kw, **kwargs)


def _round_trip(cfg, cls) -> None:
    d = json.loads(json.dumps(cfg.to_dict()))
    assert cls.from_dict(d) == cfg, f"{cls.__name__} does not survive a JSON round trip: {cfg}"


# ----------------------------------------------------------------------------- a tiny model per example

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
SMALL = {**TINY, "hidden_size": 64, "intermediate_size": 96, "head_dim": 16}  # for the SVD-heavy low-rank examples
_BASE: dict[bool, torch.nn.Module] = {}
IDS = torch.randint(2, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def tiny(small: bool = False):
    """A fresh copy of one tiny 2-layer GQA Llama (built once; ``small``: hidden 64)."""
    if small not in _BASE:
        _BASE[small] = make_tiny_llama(0, **(SMALL if small else TINY))
    return copy.deepcopy(_BASE[small])


def assert_works(model, ids=IDS) -> None:
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all(), "model broken after a valid config"


# ----------------------------------------------------------------------------- quantization

from openautoglm.quant.config import KERNELS, LAYOUTS, OBSERVERS, PACKS, SCHEMES  # noqa: E402

QUANT = {
    "scheme": field(*SCHEMES), "group_size": field(None, 32, 64, 128), "symmetric": field(None, True, False),
    "include": field(("*",), ["*mlp*"], "*.self_attn.*", ("model.layers.0.*",)),
    "exclude": field(("lm_head",), [], ["*down_proj"]), "observer": field(*OBSERVERS),
    "percentile": field(99.9, 100, 90.0), "kernel": field(*KERNELS),
    "layout": field(*LAYOUTS), "pack": field(*PACKS), "version": field(1),
}


@fuzz_settings(45)
@given(kw=kwargs_of(QUANT))
def test_quant_config_and_quantize(kw):
    from openautoglm.quant import QuantConfig, StaticQuantizer, quantize

    with case("bad_input", "QuantConfig"):
        ok, cfg = _clean(QuantConfig, kw)
        if not ok:
            return
        _round_trip(cfg, QuantConfig)
        model = tiny()
        if cfg.scheme == "static":
            sq_ok, sq = _clean(StaticQuantizer, {k: getattr(cfg, k) for k in ("observer", "percentile", "include",
                                                                             "exclude")})
            assert sq_ok, f"StaticQuantizer refused what QuantConfig accepted: {sq}"
            with sq.calibrate(model):
                model(input_ids=IDS)
            ok, res = call_clean(sq.quantize, model, names=["include", "exclude", "Linear"])
        else:
            ok, res = call_clean(quantize, model, cfg, names=["include", "exclude", "Linear"])
        if ok:
            assert_works(model)


@fuzz_settings(25)
@given(bits=field(4, 8), scheme=field(None, "w8a8", "w8", "w4"), group_size=field(None, 32, 64, 128))
def test_dynamic_quantizer_short_form(bits, scheme, group_size):
    from openautoglm import DynamicQuantizer

    with case("bad_input", "DynamicQuantizer.quantize"):
        model = tiny()
        kw = {"bits": bits, "scheme": scheme, "group_size": group_size}
        ok, _ = call_clean(DynamicQuantizer.quantize, model, names=[*kw, "Linear"], values=list(kw.values()), **kw)
        if ok:
            assert_works(model)


PATTERN = st.one_of(st.text(max_size=12), st.sampled_from(["*", "[", "]", "**", "*[!a]*", "lm_head", "\x00", "model.*"]))


@fuzz_settings(30)
@given(include=st.lists(PATTERN, max_size=3), exclude=st.lists(PATTERN, max_size=3))
def test_include_exclude_patterns(include, exclude):
    """Any pattern list: either refused clearly, or it selects what fnmatch says and the model still works."""
    import fnmatch

    from openautoglm.quant import QuantConfig, quantize

    with case("bad_input", "include/exclude"):
        kw = {"include": include, "exclude": exclude}
        ok, cfg = _clean(QuantConfig, {"scheme": "w8", **kw})
        if not ok:
            return
        model = tiny()
        expect = sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear
                        and any(fnmatch.fnmatchcase(n, p) for p in include)
                        and not any(fnmatch.fnmatchcase(n, p) for p in exclude))
        ok, res = call_clean(quantize, model, cfg, names=["include", "exclude"])
        if ok:
            assert sorted(res.quantized + list(res.skipped)) == expect
            assert_works(model)
        else:
            assert not expect, f"refused although {expect} match: {res}"


# ----------------------------------------------------------------------------- KV cache

from openautoglm.kv.cache import SUPPORTED_GROUP_SIZES  # noqa: E402

KV = {
    "bits": field(None, 2, 4, 8), "group_size": field(*SUPPORTED_GROUP_SIZES),
    "residual_length": field(0, 1, 8, 128, "auto"), "share": field(False, True), "share_start": field(None, 0, 1, 5),
    "share_threshold": field(0.9, -1.0, 1.0, 0), "version": field(2),
}


def _decode(model, cache, ids=IDS[:1]) -> None:
    from openautoglm import _hf

    with torch.no_grad():
        out = _hf.forward_with_cache(model, ids[:, :20], cache)
        for i in range(20, 24):
            out = _hf.forward_with_cache(model, ids[:, i:i + 1], _hf.output_cache(out))
    assert torch.isfinite(out.logits).all()


@fuzz_settings(50)
@given(kw=kwargs_of(KV))
def test_kv_cache_config_builds_and_decodes(kw):
    from openautoglm import KVCacheConfig

    with case("bad_input", "KVCacheConfig"):
        ok, cfg = _clean(KVCacheConfig, kw)
        if not ok:
            return
        _round_trip(cfg, KVCacheConfig)
        model = tiny()
        ok, cache = call_clean(cfg.build, model.config, names=["start_layer", "share_start", "layers"],
                               values=[cfg.share_start])
        if ok:
            _decode(model, cache)


@fuzz_settings(30)
@given(bits=field(2, 4, 8), group_size=field(*SUPPORTED_GROUP_SIZES), residual_length=field(0, 16),
       num_layers=field(None, 2))
def test_quantized_kv_cache_args(bits, group_size, residual_length, num_layers):
    from openautoglm import QuantizedKVCache

    with case("bad_input", "QuantizedKVCache"):
        kw = dict(bits=bits, group_size=group_size, residual_length=residual_length, num_layers=num_layers)
        ok, cache = _clean(QuantizedKVCache, kw)
        if ok:
            _decode(tiny(), cache)


@fuzz_settings(25)
@given(start_layer=field(None, 0), threshold=field(0.9, 0.0), t=field(0.5, 0.0, 1.0), min_shared=field(0.5, 0.0),
       bits=field(None, 4))
def test_cross_layer_cache_args(start_layer, threshold, t, min_shared, bits):
    from openautoglm import CrossLayerKVCache

    with case("bad_input", "CrossLayerKVCache"):
        model = tiny()
        kw = dict(start_layer=start_layer, threshold=threshold, t=t, min_shared=min_shared, bits=bits)
        ok, cache = _clean(CrossLayerKVCache, kw, config=model.config)
        if ok:
            _decode(model, cache)


# ----------------------------------------------------------------------------- pruning

from openautoglm.prune.importance import METHODS  # noqa: E402

HEADS = {
    "importance": field(*METHODS), "ratio": field(None, 0.25, 0.5), "num_heads": field(None, 1, 3),
    "threshold": field(None, 0.1), "scope": field("global", "per_layer"), "granularity": field("head", "kv_group"),
    "normalize": field(True, False), "n_samples": field(2, 32), "seq_len": field(16, 256), "batch_size": field(1, 2),
    "seed": field(0, 7),
}


@fuzz_settings(30)
@given(kw=kwargs_of(HEADS))
def test_head_prune_config_and_prune(kw):
    from openautoglm import HeadPruneConfig
    from openautoglm.prune import HeadPruner

    with case("bad_input", "HeadPruneConfig"):
        ok, cfg = _clean(HeadPruneConfig, kw)
        if not ok:
            return
        model = tiny()
        ok, res = call_clean(HeadPruner(cfg).prune, model, calib_ids=IDS[:, :16], progress=False,
                             names=["nothing to remove", "num_heads", "ratio", "threshold", "keep"])
        if ok:
            assert sum(q for q, _ in res.heads_after) < sum(q for q, _ in res.heads_before)
            assert_works(model)


SPARSE = {
    "sparsity": field(0.5, 0.1, 0.9), "method": field(*METHODS), "pattern": field("unstructured", "2:4", "1:4", "4:8"),
    "scope": field(None, "per_output", "per_layer", "global"), "targets": field(["*.mlp.*"], ["*proj"], []),
    "exclude": field([], ["*down_proj"]), "n_samples": field(2), "seq_len": field(16), "seed": field(0),
}


@fuzz_settings(40)
@given(kw=kwargs_of(SPARSE))
def test_sparsity_config_and_sparsify(kw):
    from openautoglm.prune import SparsityConfig, sparsify

    with case("bad_input", "SparsityConfig"):
        ok, cfg = _clean(SparsityConfig, kw)
        if not ok:
            return
        _round_trip(cfg, SparsityConfig)
        model = tiny()
        ok, res = call_clean(sparsify, model, cfg, calib_ids=IDS[:, :16], progress=False,
                             names=["targets", "exclude", "divisible"])
        if ok:
            assert 0 < res.params_pruned <= res.params_targeted
            assert_works(model)


LOWRANK = {
    "energy": field(None, 0.5, 0.9, 1.0), "param_ratio": field(None, 0.3), "method": field("activation", "plain"),
    "targets": field(["*.mlp.*"], ["*q_proj"]), "exclude": field([]), "damp": field(0.01, 0.0, 1.0),
    "rank_multiple": field(1, 16), "n_samples": field(2), "seq_len": field(16), "seed": field(0),
}


@fuzz_settings(30)
@given(kw=kwargs_of(LOWRANK))
def test_low_rank_config_and_factorize(kw):
    from openautoglm.prune import LowRankConfig, low_rank

    with case("bad_input", "LowRankConfig"):
        ok, cfg = _clean(LowRankConfig, kw)
        if not ok:
            return
        model = tiny(small=True)
        ok, res = call_clean(low_rank, model, cfg, calib_ids=IDS[:, :16], progress=False, names=["targets"])
        if ok:
            assert all(1 <= r for r in res.ranks.values())
            assert_works(model)


RECIPE = {
    "prune_heads": field(None, 0.25), "head_importance": field(*METHODS), "head_granularity": field("head", "kv_group"),
    "sparsity": field(None, 0.5), "sparsity_method": field("magnitude", "wanda"),
    "sparsity_pattern": field("unstructured", "2:4"), "low_rank": field(None, 0.9),
    "low_rank_method": field("activation", "plain"), "n_samples": field(4), "seq_len": field(32), "seed": field(0),
}


@fuzz_settings(40)
@given(kw=kwargs_of(RECIPE))
def test_prune_recipe(kw):
    from openautoglm.prune import PruneRecipe

    with case("bad_input", "PruneRecipe"):
        ok, r = _clean(PruneRecipe, kw)
        if ok:
            assert isinstance(r.empty, bool)
            json.dumps(r.to_dict())


# ----------------------------------------------------------------------------- training

TRAIN = {
    "steps": field(1, 2), "micro_batch": field(1, 2), "grad_accum": field(1, 2), "seq_len": field(8, 16),
    "lr": field(1e-3, 3e-4), "min_lr_ratio": field(0.0, 0.1, 1.0), "warmup_steps": field(0, 1),
    "weight_decay": field(0.0, 0.1), "betas": field((0.9, 0.95), [0.0, 0.5]), "grad_clip": field(0.0, 1.0),
    "optimizer": field("adamw", "adamw_foreach", "sgd", "adafactor"), "amp": field("none", "bf16"),
    "grad_checkpointing": field(False, True), "eval_every": field(0, 1), "eval_batches": field(1),
    "save_every": field(0), "out_dir": field(None), "resume": field(True, False), "seed": field(0, 3),
    "progress": field(False), "log_every": field(1, 10), "keep_fp32": field(False, True),
}


@fuzz_settings(50)
@given(kw=kwargs_of(TRAIN))
def test_train_config_and_train(kw):
    from openautoglm.training.loop import TrainConfig, train

    with case("bad_input", "TrainConfig"):
        ok, cfg = _clean(TrainConfig, kw)
        if not ok:
            return
        _round_trip(cfg, TrainConfig)
        if cfg.out_dir is not None or cfg.steps > 2 or cfg.micro_batch * cfg.grad_accum * cfg.seq_len > 64:
            return  # valid but not cheap: construction and the round trip are what this example checks
        model = tiny()
        ok, res = call_clean(train, model, IDS.flatten(), cfg, eval_data=IDS[1])
        assert ok, f"a valid TrainConfig failed to train: {res}"
        assert len(res.losses) == cfg.steps and all(math.isfinite(x) for x in res.losses)


# ----------------------------------------------------------------------------- memory: estimate, plan, bytes

ESTIMATE = {
    "mode": field("inference", "train"), "batch": field(1, 4), "seq_len": field(1, 2048, 10**6),
    "dtype": field(None, "bf16", "fp32", torch.float16), "kv_dtype": field(None, "int4", "fp8", "bf16"),
    "quantization": field(None, "w4", "w8", {"bits": 4, "group_size": 64}), "optimizer": field("adamw", "sgd", "adafactor"),
    "amp": field(None, "bf16", "none"), "grad_checkpointing": field(False, True), "grad_accum": field(1, 4),
    "tp_degree": field(1, 2), "logits": field(None, "all", "last"), "kv_group_size": field(32, 64),
    "kv_residual": field(0, 128), "kv_shared_layers": field(0, 1),
}


@fuzz_settings(80, deadline_ms=10000)
@given(model=field("open-autoglm-base", "tiny-config", "tiny-dict"), kw=kwargs_of(ESTIMATE))
def test_estimate_memory_args(model, kw):
    from transformers import LlamaConfig

    from openautoglm import estimate_memory

    with case("bad_input", "estimate_memory"):
        if model == "tiny-config":
            model = LlamaConfig(**TINY)
        elif model == "tiny-dict":
            model = {"model_type": "llama", **TINY}
        ok, est = call_clean(estimate_memory, model, names=[*kw, "model", "config", "path", "expected"],
                             values=[*kw.values(), model], **kw)
        if ok:
            assert all(isinstance(v, int) and v >= 0 for v in est.terms.values()), est.terms
            assert est.total > 0


@fuzz_settings(40, deadline_ms=15000)
@given(budget=field("40GiB", "1GiB", 10**9, "512 MB"), global_batch=field(1, 8), seq_len=field(128, 2048))
def test_plan_training_args(budget, global_batch, seq_len):
    from transformers import LlamaConfig

    from openautoglm import plan_training

    with case("bad_input", "plan_training"):
        kw = dict(budget=budget, global_batch=global_batch, seq_len=seq_len)
        ok, plan = _clean(plan_training, kw, "fits", "budget", model_or_config_or_path=LlamaConfig(**TINY))
        if ok:
            assert plan.peak_bytes <= plan.budget and plan.micro_batch * plan.grad_accum == plan.global_batch


SIZE_TEXT = st.one_of(
    st.text(max_size=10),
    st.builds(lambda n, u, sp: f"{n}{sp}{u}", st.one_of(st.integers(-5, 10**6).map(str), st.floats().map(str),
                                                         st.sampled_from(["1e400", "1e-400", ".", "1.", "1e", "+1", "0x10"])),
              st.sampled_from(["", "B", "GiB", "gb", "MiB", "KB", "TiB", "PB", "G", "ib"]), st.sampled_from(["", " ", "\t"])),
)


@fuzz_settings(150, deadline_ms=1000)
@given(text=SIZE_TEXT)
def test_byte_strings(text):
    from openautoglm.units import parse_bytes

    with case("bad_input", "parse_bytes"):
        ok, n = call_clean(parse_bytes, text, names=[text.strip() or repr(text)], values=[text])
        if ok:
            assert isinstance(n, int) and n >= 0


# ----------------------------------------------------------------------------- names and paths

NAMES = st.one_of(
    st.text(max_size=30), st.sampled_from(["", ".", "..", "/", "~", "~/nope", "a" * 300, "a/" * 3000, "x\x00y",
                                           "open-autoglm-base/../..", "meta-llama/Llama-2-7b", "/etc", "/dev/null"]),
    st.integers(), st.none(), st.binary(max_size=4),
)


@fuzz_settings(80, deadline_ms=2000)
@given(name=NAMES)
def test_model_names_and_paths(name, tmp_path_factory):
    from openautoglm import hub

    with case("bad_input", "model name/path"):
        ok, path = call_clean(hub.resolve_model_path, name, values=[name, str(name)[:40]],
                              names=["name or a folder path", "model"])
        if ok:
            assert (path / "config.json").is_file()


@pytest.mark.parametrize("out", ["", ".", "a" * 300, "x\x00y", "file/sub", "/"])
def test_save_to_bad_output_paths(out, tmp_path, monkeypatch):
    """Output names that are empty, the working folder, too long, hold NUL, sit under a file, or are the root."""
    from openautoglm import hub

    with case("bad_input", "save path"):
        monkeypatch.chdir(tmp_path)
        (tmp_path / "file").write_text("not a folder")
        (tmp_path / "config.json").write_text("{}")  # the working folder looks like a model folder
        before = sorted(p.name for p in tmp_path.iterdir())
        ok, res = call_clean(hub.save_pretrained, tiny(), out, values=[out], names=["out", "output"])
        assert not ok, f"saved to {out!r}: {res}"
        assert sorted(p.name for p in tmp_path.iterdir()) == before
