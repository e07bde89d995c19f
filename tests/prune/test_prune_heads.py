"""Head pruning: physical removal equals masking, GQA layouts, generate with a KV cache, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm import _hf, hub
from openautoglm.prune import HeadPruneConfig, HeadPruner, keep_masks, mask_heads, remove_heads
from openautoglm.prune.importance import head_mask_grads

# tiny model: 4 layers x 8 query heads, 2 KV heads (groups of 4: heads 0-3 -> KV 0, heads 4-7 -> KV 1)
UNEVEN = {0: [0, 1, 2], 1: [0, 1, 2, 3], 3: [5]}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _removed_from_scratch(model, removed):
    """Heads removed by a pruner, as indices of the unpruned model (no earlier pruning here)."""
    return {k: list(v) for k, v in removed.items()}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_removed_heads_equal_masked_heads(impl, input_ids):
    model = make_tiny_llama()
    model.config._attn_implementation = impl
    with torch.no_grad(), mask_heads(model, UNEVEN):
        ref = model(input_ids).logits
    layouts = remove_heads(model, UNEVEN)
    with torch.no_grad():
        out = model(input_ids).logits
    assert _rel(out, ref) < 1e-5
    # layer 0: group 0 keeps 1 head, group 1 keeps 4 (uneven); layer 1: KV head 0 removed with all its heads
    assert layouts[0] == [0, 1, 1, 1, 1]
    assert layouts[1] == [0, 0, 0, 0] and model.model.layers[1].self_attn.k_proj.out_features == 16
    assert len(layouts[3]) == 7 and max(layouts[3]) == 1


@pytest.mark.parametrize("importance", ["magnitude", "wanda", "taylor", "fisher"])
def test_pruner_matches_masking(importance, tokenizer, input_ids):
    model = make_tiny_llama(seed=importance.__len__())
    base = make_tiny_llama(seed=importance.__len__())
    res = HeadPruner(importance=importance, ratio=0.3, n_samples=2, seq_len=32).prune(model, tokenizer, progress=False)
    n_removed = sum(len(v) for v in res.removed.values())
    assert n_removed == round(0.3 * 32)
    assert sum(q for q, _ in res.heads_after) == 32 - n_removed
    assert all(q >= 1 for q, _ in res.heads_after)
    with torch.no_grad(), mask_heads(base, _removed_from_scratch(base, res.removed)):
        ref = base(input_ids).logits
    with torch.no_grad():
        assert _rel(model(input_ids).logits, ref) < 1e-5
    assert res.attn_weight_bytes_after < res.attn_weight_bytes_before
    assert hub.applied_transforms(model)[-1]["type"] == "prune_heads"


def test_generate_with_kv_cache_after_uneven_pruning(input_ids):
    model = make_tiny_llama()
    remove_heads(model, UNEVEN)
    prompt = input_ids[:1, :8]
    x = prompt
    with torch.no_grad():
        for _ in range(6):  # greedy decoding without a cache, the reference
            x = torch.cat([x, model(x, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        for cache in (None, "static"):
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation=cache)
            assert torch.equal(out, x), cache


def test_kv_group_granularity_shrinks_kv_cache(tokenizer):
    model = make_tiny_llama()
    res = HeadPruner(importance="magnitude", ratio=0.5, granularity="kv_group", scope="per_layer").prune(model)
    assert res.heads_after == [(4, 1)] * 4
    assert res.kv_bytes_per_token_after * 2 == res.kv_bytes_per_token_before
    before, after = res.attention_bytes(tokens=512)
    assert after / before == pytest.approx(0.5)


def test_save_load_round_trip_uneven(tmp_path, tokenizer, input_ids):
    model = make_tiny_llama()
    HeadPruner(importance="magnitude", num_heads=11, scope="global").prune(model)
    remove_heads(model, {2: [0]})  # a second pruning on top of the first
    counts = [len(_hf.attention_layout(a)) for _, a in _hf.attention_modules(model)]
    assert len(set(counts)) > 1
    model.save_pretrained(tmp_path / "pruned", tokenizer=tokenizer)
    loaded = hub.from_pretrained(tmp_path / "pruned")
    assert [len(_hf.attention_layout(a)) for _, a in _hf.attention_modules(loaded)] == counts
    with torch.no_grad():
        assert _rel(loaded(input_ids).logits, model(input_ids).logits) < 1e-6
    empty = hub.empty_model(tmp_path / "pruned")
    assert sum(p.numel() for p in empty.parameters()) == sum(p.numel() for p in model.parameters())
    out = loaded.generate(input_ids[:1, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_taylor_scores_match_finite_differences(input_ids):
    model = make_tiny_llama().double()
    ids = input_ids[:1, :16]
    g_abs, _ = head_mask_grads(model, ids, progress=False)

    def loss_with_scale(layer, head, s):
        attn = model.model.layers[layer].self_attn
        hd = attn.head_dim

        def fn(mod, args):
            x = args[0].reshape(*args[0].shape[:-1], -1, hd).clone()
            x[..., head, :] *= s
            return (x.reshape(args[0].shape),)

        h = attn.o_proj.register_forward_pre_hook(fn)
        try:
            logits = model(ids, use_cache=False).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        finally:
            h.remove()

    eps = 1e-3  # central difference; the model computes some steps (RMSNorm) in float32
    with torch.no_grad():
        for layer, head in [(0, 3), (2, 6)]:
            fd = (loss_with_scale(layer, head, 1 + eps) - loss_with_scale(layer, head, 1 - eps)) / (2 * eps)
            assert abs(abs(float(fd)) - float(g_abs[layer][head])) < 1e-5 + 2e-3 * abs(float(fd))


def test_keep_masks_global_and_per_layer():
    s = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.1, 0.2])]
    k = keep_masks(s, count=3, scope="global", min_keep=1)
    assert k[0].tolist() == [False, False, True, True] and k[1].tolist() == [False, True]  # 0.2 kept: min_keep
    k = keep_masks(s, ratio=0.5, scope="per_layer")
    assert k[0].sum() == 2 and k[1].sum() == 1
    assert keep_masks(s, threshold=2.5)[0].tolist() == [False, False, True, True]


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(importance="random"), "importance"),
    (dict(granularity="layer"), "granularity"), (dict(ratio=0.2, num_heads=3), "exactly one"),
    (dict(scope="local"), "scope"), (dict(num_heads=-2), "num_heads"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeadPruneConfig(**kwargs)


def test_bad_prune_requests():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="more than can be removed"):
        HeadPruner(importance="magnitude", num_heads=40).prune(model)
    with pytest.raises(ValueError, match="cannot remove all"):
        remove_heads(model, {0: list(range(8))})
    with pytest.raises(ValueError, match="query heads 0..7"):
        remove_heads(model, {0: [9]})
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        remove_heads(model, {7: [0]})
    with pytest.raises(ValueError, match="tokenizer"):
        HeadPruner(importance="taylor").prune(model)
    with pytest.raises(TypeError, match="not both"):
        HeadPruner(HeadPruneConfig(), ratio=0.5)


def test_uneven_layout_survives_deepcopy_and_attn_switch(input_ids):
    import copy

    model = make_tiny_llama()
    remove_heads(model, UNEVEN)
    clone = copy.deepcopy(model)
    clone.config._attn_implementation = "eager"  # the per-layer view follows the model config
    with torch.no_grad():
        assert _rel(clone(input_ids).logits, model(input_ids).logits) < 1e-5
