"""Tensor-parallel plan, layout slicing and the one-rank path, in one process (no process group needed)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from openautoglm import hub, parallel
from openautoglm.memory.estimate import estimate_memory, model_bytes
from openautoglm.parallel import ShardConfig, Slice, make_plan, module_slices, narrow_module, read_slice
from openautoglm.quant.config import QuantConfig
from openautoglm.quant.linear import LINEAR_CLASSES

LAYOUTS = [("w8a8", None, None), ("w8a8-fp8", None, None), ("static", None, None), ("w8", 32, None),
           ("w8", None, None), ("w4", 32, False), ("w4", 64, True)]


def _quant_linear(scheme, group, sym, n=64, k=128, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    cfg = QuantConfig(scheme=scheme, group_size=group, **({} if sym is None else {"symmetric": sym}))
    mod = LINEAR_CLASSES[scheme].from_linear(lin, cfg)
    if scheme == "static":
        mod.act_scale.data.fill_(0.05)
    return mod


def _cut(mod, dim, start, stop):
    import copy

    part = copy.deepcopy(mod)
    narrow_module(part, module_slices(part, dim, start, stop), dim, start, stop)
    return part


@pytest.mark.parametrize("scheme,group,sym", LAYOUTS)
def test_quantized_layouts_cut_consistently(scheme, group, sym):
    """Column parts reproduce the output columns exactly; row parts sum to the output (no dequantized copy)."""
    mod = _quant_linear(scheme, group, sym)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    y = mod(x)
    cols = [_cut(mod, "out", a, b) for a, b in ((0, 32), (32, 64))]
    assert torch.equal(torch.cat([c(x) for c in cols], -1), y)
    assert all(p.dtype == q.dtype for c in cols for p, q in zip(c.parameters(), mod.parameters()))
    rows = [_cut(mod, "in", a, b) for a, b in ((0, 64), (64, 128))]
    rows[1].bias = None  # a row-parallel bias is added once (rank 0)
    got = rows[0](x[:, :64]) + rows[1](x[:, 64:])
    if scheme in ("w8a8", "w8a8-fp8"):  # activations quantized per token per part: close, not bitwise
        assert torch.nn.functional.cosine_similarity(got.flatten(), y.flatten(), 0) > 0.999
    else:
        torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)
    kept = sum(p.numel() * p.element_size() for c in rows for p in c.parameters())
    whole = mod.state_dict()
    whole_kept = [k for k, v in mod.tp_slices("in", 0, 64).items() if v is None]
    replicated = sum(whole[k].numel() * whole[k].element_size() for k in whole_kept)
    assert kept == model_bytes(mod) + replicated - (mod.bias.numel() * 4)  # only per-channel scales are whole twice


def test_group_major_scales_are_cut_on_their_own_axes():
    """A layout that stores scales / zero points groups-major (K/group, N) is cut on the matching axes."""
    import copy
    import dataclasses

    mod = _quant_linear("w4", 32, False)
    if "layout" in {f.name for f in dataclasses.fields(mod.config)}:  # the kernels' groups-major layout
        torch.manual_seed(0)
        lin = nn.Linear(128, 64, bias=True)
        mod = LINEAR_CLASSES["w4"].from_linear(lin, dataclasses.replace(mod.config, layout="rows"))
        gm = LINEAR_CLASSES["w4"].from_linear(lin, dataclasses.replace(mod.config, layout="groups"))
    else:  # the same tensors stored transposed
        gm = copy.deepcopy(mod)
        gm.scale = nn.Parameter(mod.scale.t().contiguous(), requires_grad=False)
        gm.zero = nn.Parameter(mod.zero.t().contiguous(), requires_grad=False)
        gm.groups_major = True
    for dim, a, b in (("out", 16, 48), ("in", 32, 96)):
        want, got = _cut(mod, dim, a, b), _cut(gm, dim, a, b)
        assert torch.equal(got.qweight, want.qweight)
        assert torch.equal(got.scale.t(), want.scale) and torch.equal(got.zero.t(), want.zero)


def test_grouped_cut_off_boundary_is_a_clear_error():
    mod = _quant_linear("w4", 64, False)
    with pytest.raises(ValueError, match="multiples of 64 in features"):
        mod.tp_slices("in", 0, 32)
    with pytest.raises(ValueError, match="two rows a byte"):
        mod.tp_slices("out", 0, 31)


def test_plan_errors_name_the_layer():
    model = make_tiny_llama()  # 8 query heads, 2 KV heads, MLP 256
    with pytest.raises(ValueError, match=r"layer 0 \(8 query / 2 KV heads\) over 3 ranks: tp_size=3 does not divide"):
        make_plan(model, 3)
    with pytest.raises(ValueError, match="does not divide its 8 query heads"):
        parallel.shard(model, tp_size=3)  # the plan is checked before a process group is needed
    assert getattr(model, "shard_plan", None) is None and model.model.layers[0].self_attn.q_proj.out_features == 128
    with pytest.raises(ValueError, match="tp_size=2 needs 2 processes"):
        parallel.shard(model, tp_size=2)
    with pytest.raises(ValueError, match="tp_degree=3"):
        estimate_memory(model, tp_degree=3)
    with pytest.raises(ValueError, match="rank"):
        make_plan(model, 2, rank=2)
    from openautoglm.quant.api import quantize

    q_all = make_tiny_llama()
    quantize(q_all, QuantConfig(scheme="w4", group_size=128))  # o_proj: 2 heads x 16 per rank inside a group of 128
    with pytest.raises(ValueError, match="boundaries of 8 heads that q_proj/o_proj need .quantization groups of 128"):
        make_plan(q_all, 4)
    quantize(model, QuantConfig(scheme="w4", group_size=128, include=["*mlp*"]))  # MLP 256 / 4 ranks = 64
    with pytest.raises(ValueError, match="must be cut at group boundaries.*allow_uneven"):
        make_plan(model, 4)
    with pytest.raises(ValueError, match="cannot give each of 4 ranks"):
        make_plan(model, 4, config=ShardConfig(allow_uneven=True))
    assert make_plan(model, 2).layers[0].mlp == (0, 128)


def test_gqa_plan_replicates_kv_heads_when_fewer_than_ranks():
    model = make_tiny_llama()
    plans = [make_plan(model, 4, r) for r in range(4)]
    assert [p.layers[0].q_heads for p in plans] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [p.layers[0].kv_heads for p in plans] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert all(p.layers[0].kv_index == [0, 0] for p in plans)
    assert plans[1].tensors["model.layers.0.self_attn.o_proj.weight"] == Slice(1, 32, 64)
    assert plans[1].vocab == (2048, 4096) and plans[1].tensors["lm_head.weight"] == Slice(0, 2048, 4096)
    plans2 = [make_plan(model, 2, r) for r in range(2)]
    assert [p.layers[0].kv_heads for p in plans2] == [(0, 1), (1, 2)]


def test_pruned_uneven_groups_error_or_unbalanced_plan():
    from openautoglm.prune import remove_heads

    model = make_tiny_llama()
    remove_heads(model, {0: [0], 1: [1, 2]})  # layer 0: groups 3+4 heads; layer 1: 2+4
    with pytest.raises(ValueError, match="layer 0 .*does not divide its 7 query heads"):
        make_plan(model, 2)
    plans = [make_plan(model, 2, r, ShardConfig(allow_uneven=True)) for r in range(2)]
    assert [p.layers[0].q_heads for p in plans] == [(0, 4), (4, 7)]
    assert [p.layers[0].kv_index for p in plans] == [[0, 0, 0, 1], [0, 0, 0]]
    assert [p.layers[1].kv_index for p in plans] == [[0, 0, 1], [0, 0, 0]]


def test_config_validation_and_json():
    c = ShardConfig(tp_size=2, vocab="replicate", allow_uneven=True)
    assert ShardConfig.from_json(c.to_json()) == c
    for bad, err in (({"tp_size": 0}, "tp_size"), ({"vocab": "split"}, "vocab"), ({"tp_size": True}, "tp_size")):
        with pytest.raises(ValueError, match=err):
            ShardConfig(**bad)
    with pytest.raises(ValueError, match="conflicts"):
        ShardConfig.resolve(4, c)
    with pytest.raises(ValueError, match="unknown ShardConfig fields"):
        ShardConfig.from_dict({"tp": 2})


def test_unsupported_architecture_is_a_type_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match="Llama-style self_attn"):
        make_plan(model, 2)


def test_one_rank_path_is_the_plain_model(tiny_llama_dir, input_ids):
    """tp_size=1 (no process group): the same tensors, no hooks, bitwise the same logits; the sharded loader too."""
    ref = hub.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        want = ref(input_ids).logits
    m = parallel.shard(make_tiny_llama(), tp_size=1)
    loaded = parallel.from_pretrained(tiny_llama_dir, tp_size=1)
    for mod in (m, loaded):
        assert not any(x._forward_hooks for x in mod.modules())
        with torch.no_grad():
            assert torch.equal(mod(input_ids).logits, want)
        assert model_bytes(mod) == model_bytes(ref)
        with pytest.raises(ValueError, match="tensor-parallel shard"):
            mod.save_pretrained("/tmp/never")
    assert loaded.shard_load_stats["bytes_read"] == loaded.shard_load_stats["checkpoint_bytes"]
    with pytest.raises(ValueError, match="already sharded"):
        parallel.shard(m, tp_size=1)


def test_cli_tp_without_torchrun_says_how_to_launch(tiny_llama_dir, capsys):
    from openautoglm.cli import main

    assert main(["generate", str(tiny_llama_dir), "Hello", "--tp", "2"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_read_slice_reads_the_rows_and_columns(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    t = torch.arange(48, dtype=torch.int16).reshape(6, 8)
    save_file({"t": t}, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as h:
        assert torch.equal(read_slice(h, "t", Slice(0, 2, 4)), t[2:4])
        assert torch.equal(read_slice(h, "t", Slice(1, 4, 8)), t[:, 4:])
        assert torch.equal(read_slice(h, "t", None), t)
