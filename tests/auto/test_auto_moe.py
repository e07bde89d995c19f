"""compress_to_budget on a tiny Mixtral: the routed experts of each layer are a unit of their own (bits chosen
separately from the attention's), their bytes priced exactly (the estimator's figures), their sensitivity measured by
the Fisher pass through the quantized experts, and quantized by the picked recipe."""

from __future__ import annotations

import pytest
from conftest import make_tiny

from openautoglm.auto import compress_to_budget
from openautoglm.auto.space import find_units
from openautoglm.memory import estimate_memory
from openautoglm.quant.experts import QuantExperts

SETTINGS = dict(context=64, batch=1, schemes=("bf16", "w8", "w4g128"), kv_bits=(None,), prune_ratios=(),
                calib_tokens=64, verify_tokens=128, eval_tokens=128, n_prompts=1, new_tokens=4, top_k=2, progress=False)


def _model():  # 16 experts of width 256: most of the bytes, so the budget can only be met by quantizing them
    return make_tiny("mixtral", intermediate_size=256, num_local_experts=16)


def test_experts_are_units_of_their_own():
    units = find_units(_model())
    experts = [u for u in units if u.kind == "experts"]
    assert [u.modules for u in experts] == [("model.layers.0.mlp.experts",), ("model.layers.1.mlp.experts",)]
    assert not any(u.kind == "mlp" for u in units)  # Mixtral's MoE block holds no Linear besides its experts


@pytest.mark.slow
def test_budget_search_quantizes_experts(tokenizer, tmp_path):
    model = _model()
    full = estimate_memory(model, batch=1, seq_len=64, device="cpu").total
    budget = int(0.6 * full)
    r = compress_to_budget(model, budget, tokenizer=tokenizer, cache_dir=tmp_path, **SETTINGS)
    assert r.pick.bytes <= budget
    assert any(isinstance(m, QuantExperts) for m in model.modules())
    est = estimate_memory(model, batch=1, seq_len=64, device="cpu")
    picked = r.pick.terms
    assert est.terms["weights"] == picked["weights"] and est.terms["workspace"] == picked["workspace"]
    # the search's tables price the routed activations of the grouped path (what CUDA runs for float and quantized
    # experts alike); on the CPU quantized experts run the reference loop, which holds less
    assert est.total <= r.pick.bytes
