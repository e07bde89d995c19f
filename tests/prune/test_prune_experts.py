"""Expert pruning (:mod:`openautoglm.prune.experts`) on every MoE family: the least routed experts go, the router's
rows with them; the pruned model computes what the original does with those experts never chosen, and reloads with its
new shapes (float, and quantized before or after pruning)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MOE_FAMILIES, make_tiny

from openautoglm import AutoModelForCausalLM, QuantConfig, _hf, hub, quantize
from openautoglm.prune import ExpertPruneConfig, expert_usage, prune_experts, remove_experts


def _ids(b=4, t=32, seed=0):
    return torch.randint(2, 8192, (b, t), generator=torch.Generator().manual_seed(seed))


def _blocks(model):
    return {i: _hf.moe.moe_block(lay) for i, lay in enumerate(_hf.decoder_layers(model)) if _hf.moe.moe_block(lay)}


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_prune_keeps_most_routed_experts_and_reloads(family, tmp_path):
    model = make_tiny(family)
    calib = _ids()
    usage = expert_usage(model, calib)
    res = prune_experts(model, ExpertPruneConfig(keep=3), calib_ids=calib)
    for i, u in usage.items():
        assert len(res.kept[i]) == 3 and min(u[res.kept[i]]) >= max(
            u[[e for e in range(4) if e not in res.kept[i]]])  # the dropped expert was routed to least
        block = _blocks(model)[i]
        assert block.experts.num_experts == 3 and _hf.moe.router_of(block).weight.shape[0] == 3
    assert res.bytes_after < res.bytes_before
    x = _ids(2, 16, 9)
    with torch.no_grad():
        out = model(x).logits
    model.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert hub.applied_transforms(again)[-1]["type"] == "prune_experts"
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_pruned_equals_original_with_dropped_experts_never_chosen(family):
    """A softmax router over the experts left = the original router with the dropped experts' logits at -inf."""
    model = make_tiny(family)
    ref = make_tiny(family)
    drop = {i: 1 for i in _blocks(model)}
    remove_experts(model, {i: [e for e in range(4) if e != d] for i, d in drop.items()})
    for i, block in _blocks(ref).items():
        router = block.gate

        def masked(hidden, router=router, d=drop[i]):
            w = router.weight.detach().clone()
            logits = F.linear(hidden.reshape(-1, router.hidden_dim), w)
            logits[:, d] = -float("inf")
            probs = torch.softmax(logits.float(), -1)
            top, idx = torch.topk(probs, router.top_k, -1)
            return logits, top / top.sum(-1, keepdim=True), idx

        router.forward = masked
    x = _ids(2, 16, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["quantize_then_prune", "prune_then_quantize"])
def test_pruning_and_quantization_in_either_order_reload(order, tmp_path):
    model = make_tiny("gpt_oss")  # transposed experts with biases
    keep = {i: [0, 2, 3] for i in _blocks(model)}
    steps = [lambda: quantize(model, QuantConfig(scheme="w4")), lambda: remove_experts(model, keep)]
    for step in steps if order == "quantize_then_prune" else steps[::-1]:
        step()
    x = _ids(2, 16, 3)
    with torch.no_grad():
        out = model(x).logits
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)
    assert _blocks(again)[0].experts.num_experts == 3


def test_bad_requests_are_refused():
    model = make_tiny("mixtral")
    with pytest.raises(ValueError, match="exactly one of"):
        ExpertPruneConfig()
    with pytest.raises(ValueError, match="top-2"):
        remove_experts(model, {0: [1]})
    with pytest.raises(ValueError, match="distinct experts"):
        remove_experts(model, {0: [0, 0, 1]})


def test_cli_prune_experts_then_compress(tmp_path, tokenizer, capsys):
    from openautoglm.cli import main

    hub.save_pretrained(make_tiny("qwen3_moe"), tmp_path / "m", tokenizer=tokenizer)
    assert main(["prune", str(tmp_path / "m"), "--prune-experts", "0.25", "--calib-samples", "2",
                 "--out", str(tmp_path / "p")]) == 0
    assert "[4] -> [3] per MoE layer" in capsys.readouterr().out
    assert main(["compress", str(tmp_path / "p"), "--bits", "4", "--out", str(tmp_path / "q")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert [t["type"] for t in hub.applied_transforms(again)] == ["prune_experts", "quantize"]
    assert _blocks(again)[0].experts.num_experts == 3
