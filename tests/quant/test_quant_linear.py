"""quant/linear.py + kernels.py (CPU paths): each scheme's Linear vs the float reference, configs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from openautoglm.quant import LINEAR_CLASSES, QuantConfig
from openautoglm.quant.config import SCHEMES


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0))


def _linear(k=256, n=128, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


@pytest.mark.parametrize("scheme,group,sym,min_cos", [
    ("w8a8", None, None, 0.999), ("w8a8-fp8", None, None, 0.999), ("static", None, None, 0.999),
    ("w8", None, None, 0.999), ("w8", 32, None, 0.999), ("w8", 128, None, 0.999),
    ("w4", 32, None, 0.99), ("w4", 64, None, 0.99), ("w4", 128, None, 0.99), ("w4", 128, True, 0.99),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_float_reference(scheme, group, sym, min_cos, dtype):
    lin = _linear().to(dtype)
    cfg = QuantConfig(scheme=scheme, group_size=group, symmetric=sym)
    q = LINEAR_CLASSES[scheme].from_linear(lin, cfg)
    x = torch.randn(3, 7, 256, dtype=dtype)
    if scheme == "static":
        q.act_scale.data.fill_(float(x.abs().max()) / 127)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _cos(out, ref) > min_cos, scheme


def test_storage_shapes_and_dtypes():
    lin = _linear(k=256, n=64, bias=False)
    w4 = LINEAR_CLASSES["w4"].from_linear(lin, QuantConfig(scheme="w4"))
    assert w4.qweight.shape == (64, 128) and w4.qweight.dtype == torch.uint8
    assert w4.scale.shape == (2, 64) and w4.zero.shape == (2, 32) and w4.zero.dtype == torch.uint8  # groups-major
    old = LINEAR_CLASSES["w4"].from_linear(lin, QuantConfig(scheme="w4", layout="rows"))
    assert old.scale.shape == (64, 2) and old.zero.shape == (32, 2)
    assert torch.equal(old.qweight, w4.qweight) and torch.equal(old.scale, w4.scale.t())
    assert torch.equal(old.zero, w4.zero.t())  # same codes and values, only the layout differs
    x = torch.randn(3, 256)
    assert torch.equal(old(x), w4(x))
    w4s = LINEAR_CLASSES["w4"].from_linear(lin, QuantConfig(scheme="w4", symmetric=True))
    assert w4s.zero is None
    w8 = LINEAR_CLASSES["w8a8"].from_linear(lin, QuantConfig())
    assert w8.qweight.dtype == torch.int8 and w8.scale.shape == (64, 1)
    fp8 = LINEAR_CLASSES["w8a8-fp8"].from_linear(lin, QuantConfig(scheme="w8a8-fp8"))
    assert fp8.qweight.dtype == torch.float8_e4m3fn
    assert all(not p.requires_grad for p in w4.parameters())
    assert "scheme=w4" in repr(w4)


def test_nan_weight_rejected():
    lin = _linear()
    lin.weight.data[3, 5] = float("nan")
    for s in ("w8a8", "w8a8-fp8", "w4"):
        with pytest.raises(ValueError, match="NaN"):
            LINEAR_CLASSES[s].from_linear(lin, QuantConfig(scheme=s))


def test_unsupported_shapes_reported():
    cfg = QuantConfig(scheme="w4", group_size=128)
    assert "not divisible" in LINEAR_CLASSES["w4"].supports(nn.Linear(192, 64), cfg)
    assert LINEAR_CLASSES["w4"].supports(nn.Linear(256, 64), cfg) is None
    assert "multiple of 16" in LINEAR_CLASSES["w8a8"].supports(nn.Linear(100, 64), QuantConfig())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_config_json_round_trip(scheme):
    cfg = QuantConfig(scheme=scheme, include=("model.*",), exclude=("lm_head", "*.0.*"))
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["scheme"] == scheme


@pytest.mark.parametrize("kwargs,err", [
    (dict(scheme="w3"), "unknown scheme"),
    (dict(scheme="w4", group_size=100), "group_size=100"),
    (dict(scheme="w8a8", group_size=128), "per-channel"),
    (dict(scheme="w8", symmetric=False), "symmetric only"),
    (dict(observer="mse"), "observer"),
    (dict(percentile=10), "percentile"),
    (dict(kernel="cuda"), "kernel"),
    (dict(version=2), "version"),
])
def test_config_validation(kwargs, err):
    with pytest.raises(ValueError, match=err):
        QuantConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"scheme": "w8", "bitz": 8})


def test_patterns():
    cfg = QuantConfig(include=("model.layers.*.mlp.*",), exclude=("*.down_proj",))
    assert cfg.matches("model.layers.3.mlp.up_proj")
    assert not cfg.matches("model.layers.3.mlp.down_proj")
    assert not cfg.matches("model.layers.3.self_attn.q_proj")
    assert QuantConfig(scheme="w4").group_size == 128 and QuantConfig(scheme="w4").symmetric is False


def test_old_checkpoint_config_reads_row_layout():
    d = QuantConfig(scheme="w4").to_dict()
    del d["layout"], d["pack"]  # what checkpoints written before the layout and pack fields recorded
    assert QuantConfig.from_dict(d).layout == "rows" and QuantConfig.from_dict(d).pack == "pairs"
    assert QuantConfig(scheme="w4").layout == "groups" and QuantConfig(scheme="w4").pack == "k32"
    with pytest.raises(ValueError, match="layout"):
        QuantConfig(scheme="w4", layout="cols")
    with pytest.raises(ValueError, match="pack"):
        QuantConfig(scheme="w4", pack="k64")


def test_k32_order_stores_the_same_codes():
    """k32 and pairs hold the same codes, so the same outputs."""
    from openautoglm.quant.math import pack_int4, unpack_int4, unpack_int4_k32

    lin = _linear(k=256, n=64, bias=False)
    new = LINEAR_CLASSES["w4"].from_linear(lin, QuantConfig(scheme="w4"))
    old = LINEAR_CLASSES["w4"].from_linear(lin, QuantConfig(scheme="w4", pack="pairs"))
    assert new.qweight.shape == old.qweight.shape and not torch.equal(new.qweight, old.qweight)
    assert torch.equal(pack_int4(unpack_int4_k32(new.qweight)), old.qweight)
    x = torch.randn(5, 256)
    assert torch.equal(new(x), old(x))
    # word w, nibble p of each 16-byte block holds code 4 p + w of the block
    words = new.qweight.view(torch.int32)
    codes = unpack_int4(old.qweight).int()
    for w in range(4):
        for p in range(8):
            assert torch.equal((words[:, w::4] >> (4 * p)) & 15, codes[:, 4 * p + w::32])



@pytest.mark.slow
def test_layouts_give_identical_perplexity_on_bundled_model():
    """The group-major scale layout and the k32 code order store the same codes and scales: held-out perplexity
    is identical to the "rows" / "pairs" storage of older checkpoints."""
    import copy

    from openautoglm import AutoModelForCausalLM, AutoTokenizer
    from openautoglm.evaluate import perplexity
    from openautoglm.quant import quantize

    tok = AutoTokenizer.from_pretrained("open-autoglm-base")
    base = AutoModelForCausalLM.from_pretrained("open-autoglm-base", dtype="float32")
    ppl = {}
    for layout, pack in (("rows", "pairs"), ("groups", "k32")):  # older checkpoints vs today's default
        m = copy.deepcopy(base)
        quantize(m, QuantConfig(scheme="w4", layout=layout, pack=pack, include=("*mlp*",)))
        ppl[layout, pack] = perplexity(m, tok, max_tokens=128, seq_len=128, batch_size=1).perplexity
    assert len(set(ppl.values())) == 1, ppl


def test_tuned_gemv_configs_are_used():
    from openautoglm.quant.kernels import ops

    assert ops.GEMV_TUNED, "gemv_tuned.json is shipped with the package"
    key = next(iter(ops.GEMV_TUNED))
    fmt, bucket, n, k = key
    cfg = ops.gemv_config(bucket, n, k, fmt, 128, torch.device("cpu"))
    assert {name: cfg[name] for name in ops.GEMV_TUNED[key]} == ops.GEMV_TUNED[key]


def test_fused_prefill_dispatch():
    """Which layers may share one dequantized matrix at prefill (kernels.prefill_group), and when the fused
    path is taken (kernels.fused_linears): never on the CPU; on the GPU path only at one row (decode) or more
    than DECODE_MAX_M rows of weight-only layers of one format, group and layout."""
    from openautoglm.quant import kernels

    def mk(scheme, n=32, **kw):
        return LINEAR_CLASSES[scheme].from_linear(nn.Linear(256, n).half(), QuantConfig(scheme=scheme, **kw))

    w4, w4b, w8 = [mk("w4"), mk("w4", 16)], mk("w4", group_size=32), [mk("w8"), mk("w8", 48)]
    ops_ = kernels.prefill_group(w4)
    assert ops_ is not None and [o[0] for o in ops_] == [m.qweight for m in w4] and ops_[0][3:] == (5, 128, True)
    assert kernels.prefill_group(w8)[0][3:] == (8, 256, True)
    assert kernels.prefill_group(w4 + [w4b]) is None                       # another group size
    assert kernels.prefill_group([w4[0], w8[0]]) is None                    # another format
    assert kernels.prefill_group([w4[0], mk("w4", layout="rows")]) is None  # another scale layout
    assert kernels.prefill_group([mk("w8a8"), mk("w8a8")]) is None          # prefill quantizes activations
    assert kernels.prefill_group([mk("w4", kernel="torch"), mk("w4", kernel="torch")]) is None
    assert kernels.prefill_group([mk("w4", kernel="tinygemm"), mk("w4", kernel="tinygemm")]) is not None
    assert kernels.prefill_group([w4[0]]) is None and kernels.prefill_group([w4[0], nn.Linear(256, 32)]) is None
    x = torch.randn(1, 40, 256, dtype=torch.float16)
    assert kernels.fused_linears(x, w4) is None  # CPU: each layer's own torch path
