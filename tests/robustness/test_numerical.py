"""Numerical faults: a NaN/Inf in a weight, or in an activation during calibration (static quantization, Wanda,
low-rank, head importance) or training, is reported with the layer and tensor, and the model is left as it was:
no verb turns a fault into a silently broken model.
"""

from __future__ import annotations

import copy

import pytest
import torch

from openautoglm._util.finite import NonFiniteError

from ._support import case
from .test_bad_input_api import IDS, tiny

pytestmark = pytest.mark.timeout(300)
CALIB = IDS[:, :16]
FAULTY = "model.layers.1.mlp.down_proj"


def _verbs():
    from openautoglm.prune import HeadPruner, LowRankConfig, SparsityConfig, low_rank, sparsify
    from openautoglm.quant import DynamicQuantizer, QuantConfig, StaticQuantizer, quantize

    def static(m):
        sq = StaticQuantizer()
        with sq.calibrate(m):
            m(input_ids=CALIB)
        sq.quantize(m)

    return {
        "quantize w8a8": lambda m: quantize(m, QuantConfig()),
        "quantize w4": lambda m: DynamicQuantizer.quantize(m, bits=4, group_size=32),
        "static quant": static,
        "sparsity magnitude": lambda m: sparsify(m, SparsityConfig(method="magnitude"), progress=False),
        "sparsity wanda": lambda m: sparsify(m, SparsityConfig(method="wanda"), calib_ids=CALIB, progress=False),
        "sparsity taylor": lambda m: sparsify(m, SparsityConfig(method="taylor"), calib_ids=CALIB, progress=False),
        "low-rank plain": lambda m: low_rank(m, LowRankConfig(method="plain", targets=["*"]), progress=False),
        "low-rank activation": lambda m: low_rank(m, LowRankConfig(targets=["*"]), calib_ids=CALIB, progress=False),
        "heads magnitude": lambda m: HeadPruner(importance="magnitude").prune(m, calib_ids=CALIB, progress=False),
        "heads wanda": lambda m: HeadPruner(importance="wanda").prune(m, calib_ids=CALIB, progress=False),
        "heads taylor": lambda m: HeadPruner(importance="taylor").prune(m, calib_ids=CALIB, progress=False),
    }


VERBS = list(_verbs())


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(
        torch.nan_to_num(sa[k], 7.0, 8.0, 9.0), torch.nan_to_num(sb[k], 7.0, 8.0, 9.0)) for k in sa)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("verb", VERBS)
def test_nonfinite_weight_is_named(verb, value):
    """One bad entry in a weight the verb reads: refused naming ``<layer>.weight`` (the attention projection for
    head pruning, the MLP projection otherwise); the model is untouched."""
    target = "model.layers.1.self_attn.o_proj" if verb.startswith("heads") else FAULTY
    with case("numerical", f"weight {value}: {verb}"):
        m = tiny()
        with torch.no_grad():
            m.get_submodule(target).weight[3, 5] = value
        ref = copy.deepcopy(m)
        with pytest.raises(NonFiniteError) as ei:
            _verbs()[verb](m)
        assert target in str(ei.value) and "NaN" in str(ei.value), str(ei.value)
        assert _same(m, ref), f"{verb} changed the model before refusing"


def _poison_activations(m):
    """A forward hook that puts a NaN and an Inf into the output of layer 1's input norm (weights stay finite)."""
    def hook(mod, args, out):
        out = out.clone()
        out[..., 0, 3] = float("nan")
        out[..., -1, 7] = float("inf")
        return out
    return m.get_submodule("model.layers.1.input_layernorm").register_forward_hook(hook)


CALIBRATED = ["static quant", "sparsity wanda", "sparsity taylor", "low-rank activation", "heads wanda", "heads taylor"]


@pytest.mark.parametrize("verb", CALIBRATED)
def test_nonfinite_activation_during_calibration_is_named(verb):
    with case("numerical", f"activation: {verb}"):
        m = tiny()
        ref = copy.deepcopy(m)
        h = _poison_activations(m)
        try:
            with pytest.raises(NonFiniteError) as ei:
                _verbs()[verb](m)
        finally:
            h.remove()
        msg = str(ei.value)
        assert "model.layers.1." in msg and "NaN/Inf" in msg, msg
        if verb not in ("static quant",):
            assert "model.layers.1.input_layernorm" in msg, f"the origin is not named: {msg}"
        assert _same(m, ref), f"{verb} changed the model before refusing"


def test_nonfinite_training_loss_stops_before_the_step(tmp_path):
    from openautoglm.training.loop import TrainConfig, train

    with case("numerical", "training loss NaN"):
        m = tiny()
        ids = IDS.flatten()
        cfg = TrainConfig(steps=3, micro_batch=1, seq_len=16, amp="none", progress=False, save_every=1,
                          out_dir=str(tmp_path / "run"))
        train(m, ids, cfg)
        h = _poison_activations(m)
        before = copy.deepcopy(m)
        with pytest.raises(NonFiniteError, match=r"step 4: the training loss is nan.*checkpoint.*intact"):
            train(m, ids, TrainConfig(**{**cfg.to_dict(), "steps": 5}))
        h.remove()
        assert all(torch.isfinite(p).all() for p in m.parameters()), "a NaN step reached the weights"
        assert _same(m, before)
