"""MemoryProfiler on CPU: exact tensor accounting and the breakdown in the estimator's terms."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama

from openautoglm.memory import MemoryProfiler


def test_tracker_counts_live_tensor_peak_exactly():
    with MemoryProfiler("cpu") as prof:
        a = torch.randn(1024, 256)           # 1 MiB
        b = torch.randn(512, 256)            # 0.5 MiB
        del a
        c = torch.randn(256, 256)            # 0.25 MiB: peak stays 1.5 MiB
    assert prof.peak_bytes == 1024 * 256 * 4 + 512 * 256 * 4
    assert prof.peak_rss >= prof.start_rss > 0
    del b, c


def test_breakdown_and_per_module_peaks():
    model = make_tiny_llama(0)
    x = torch.randint(2, 8192, (2, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with MemoryProfiler(model=model, optimizer=opt, per_module=True) as prof:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    b = prof.breakdown()
    n = sum(p.numel() * 4 for p in model.parameters())
    assert b["gradients"] == n and b["optimizer_states"] == n
    assert b["weights"] >= n and b["total"] >= b["weights"] + b["gradients"] + b["optimizer_states"]
    assert prof.module_peaks["model.layers.0.mlp"] > 0
