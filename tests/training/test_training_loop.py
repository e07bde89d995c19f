"""The training loop: loss goes down, accumulation equals a big batch, checkpoints resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm.training.loop import TrainConfig, batch_at, lr_at, train


def _ids(n=4096, seed=0):
    # a learnable stream: a repeating pattern with noise
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 97 + 2
    noise = torch.randint(2, 8192, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, noise, base)


def _cfg(**kw):
    return TrainConfig(**{**dict(steps=6, micro_batch=2, seq_len=32, lr=3e-3, amp="none", progress=False,
                                 warmup_steps=1, eval_batches=2), **kw})


def test_config_validation_and_json_round_trip():
    cfg = _cfg(amp="bf16", grad_accum=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="int8")
    with pytest.raises(ValueError, match="micro_batch"):
        TrainConfig(micro_batch=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="unknown TrainConfig"):
        TrainConfig.from_dict({"stepz": 3})


def test_cosine_schedule_shape():
    cfg = _cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55, abs=1e-6)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_loss_decreases_with_amp_and_checkpointing():
    model = make_tiny_llama(0)
    ids = _ids()
    res = train(model, ids, _cfg(steps=12, amp="bf16", grad_checkpointing=True, eval_every=6), eval_data=_ids(seed=1))
    assert len(res.losses) == 12 and all(torch.isfinite(torch.tensor(res.losses)))
    assert res.losses[-1] < res.losses[0] - 0.3
    assert [e["step"] for e in res.evals] == [6, 12]
    assert next(model.parameters()).dtype == torch.float32  # fp32 model stays fp32


def test_half_model_trains_with_fp32_master_weights_and_comes_back_half():
    model = make_tiny_llama(0, torch.bfloat16)
    seen = []
    res = train(model, _ids(), _cfg(steps=2, amp="bf16"),
                callback=lambda step, loss: seen.append(next(model.parameters()).dtype))
    assert seen == [torch.float32, torch.float32] and res.steps == 2
    assert next(model.parameters()).dtype == torch.bfloat16
    model = make_tiny_llama(0, torch.bfloat16)
    train(model, _ids(), _cfg(steps=1, amp="bf16", keep_fp32=True))
    assert next(model.parameters()).dtype == torch.float32


def test_accumulation_matches_big_batch():
    ids = _ids()
    a, b = make_tiny_llama(0), make_tiny_llama(0)
    cfg_big = _cfg(steps=1, micro_batch=4, grad_accum=1, optimizer="sgd", grad_clip=0, weight_decay=0.0)
    cfg_acc = _cfg(steps=1, micro_batch=2, grad_accum=2, optimizer="sgd", grad_clip=0, weight_decay=0.0)
    # same 4 windows: the big batch's windows are the two micro-batches' windows concatenated
    x = torch.cat([batch_at(ids, 0, 0, cfg_acc), batch_at(ids, 0, 1, cfg_acc)])
    # the loop with accumulation vs a manual step on the same windows with the same optimizer math
    train(b, ids, cfg_acc)
    opt = torch.optim.SGD(a.parameters(), lr=lr_at(0, cfg_big), momentum=0.9)
    a.train()
    a(input_ids=x[:2], labels=x[:2]).loss.div(2).backward()
    a(input_ids=x[2:], labels=x[2:]).loss.div(2).backward()
    opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=n)


def test_checkpoint_resume_is_exact(tmp_path):
    ids = _ids()
    full = make_tiny_llama(0)
    r_full = train(full, ids, _cfg(steps=6))
    part = make_tiny_llama(0)

    def crash(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted after step 4; the last checkpoint is step 3's
        train(part, ids, _cfg(steps=6, save_every=3, out_dir=str(tmp_path)), callback=crash)
    ck = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    assert ck["step"] == 3 and (tmp_path / "checkpoint" / "model.safetensors").is_file()
    resumed = make_tiny_llama(5)  # different init: everything must come from the checkpoint
    r = train(resumed, ids, _cfg(steps=6, out_dir=str(tmp_path)))
    assert r.resumed_from == 3
    assert r.losses == pytest.approx(r_full.losses, rel=1e-4)
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob(".checkpoint.*"))  # no temp or backup folders left


def test_text_needs_tokenizer_and_trains_on_text(tokenizer):
    model = make_tiny_llama(0)
    with pytest.raises(TypeError, match="tokenizer"):
        train(model, "some text", _cfg(steps=1))
    res = train(model, "def f(x):\n    return x + 1\n" * 40, _cfg(steps=2, optimizer="adafactor"), tokenizer=tokenizer)
    assert res.steps == 2 and res.tokens == 2 * 2 * 32
