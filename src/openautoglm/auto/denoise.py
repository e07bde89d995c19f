"""From measured single-change signals to the costs the search uses.

A signal is the NLL increase on a few thousand calibration tokens; its noise (the spread between calibration
windows) is often as large as the effect itself (1e-3 nats for a w4 unit of the bundled model), and a knapsack
left to itself buys the noise: a unit measured "free" at w4 gets w4, and the held-out text disagrees. So:

1. shrinkage (empirical Bayes): within each option, the units of one kind (attention, MLP, lm_head; the KV
   layers) are pulled towards their mean by ``tau^2 / (tau^2 + se^2)``, ``se^2`` the pooled squared standard
   error of the signals (between calibration windows) and ``tau^2`` the spread between units left once that
   noise is taken out -- a unit keeps its own figure only as far as the data tell it apart;
2. no change lowers the NLL in expectation: clamped at 0;
3. within a unit (or KV layer) fewer bits never cost less: pooled adjacent violators over the options ordered by
   expected error (bf16 < w8 < w8a8 < w4g32 < w4g64 < w4g128; KV bf16 < int8 < int4 < int2).
"""

from __future__ import annotations

import copy
import math

# options from the least to the most expected error (weights, KV bits)
PRECISION_ORDER = {"bf16": 0, "w8": 1, "w8a8": 2, "w4g32": 3, "w4g64": 4, "w4g128": 5}
KV_ORDER = {None: 0, 8: 1, 4: 2, 2: 3}
INF = float("inf")


def monotone(row: list[float], order: list[int]) -> list[float]:
    """``row`` made non-decreasing (and >= 0) along ``order`` by pooling adjacent violators; inf stays inf."""
    idx = [i for i in order if row[i] != INF]
    blocks: list[list[float]] = []  # [sum, count]
    for i in idx:
        blocks.append([max(0.0, row[i]), 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out = list(row)
    for i, v in zip(idx, [b[0] / b[1] for b in blocks for _ in range(b[1])]):
        out[i] = v
    return out


def shrink(values: list[float], ses: list[float]) -> tuple[list[float], float]:
    """Values pulled towards their mean by ``tau^2 / (tau^2 + mean(se^2))``; returns them and that weight."""
    finite = [(v, s) for v, s in zip(values, ses) if v != INF]
    if len(finite) < 3:
        return list(values), 1.0
    m = sum(v for v, _ in finite) / len(finite)
    var = sum((v - m) ** 2 for v, _ in finite) / (len(finite) - 1)
    noise = sum(s * s for _, s in finite) / len(finite)
    tau2 = max(0.0, var - noise)
    w = tau2 / (tau2 + noise) if tau2 + noise > 0 else 1.0
    return [v if v == INF else m + w * (v - m) for v in values], w


def denoised(s):
    """A copy of :class:`.sensitivity.Sensitivities` with the search's costs (module docstring); the weights of the
    shrinkage are in ``copy.calibration["shrinkage"]``."""
    out = copy.deepcopy(s)
    weights = {}
    if s.weight_se:
        kinds = [u.rsplit(".", 1)[-1] for u in s.units]
        for kind in sorted(set(kinds)):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            for o, name in enumerate(s.options):
                col, w = shrink([s.weight[i][o] for i in rows], [s.weight_se[i][o] for i in rows])
                for i, v in zip(rows, col):
                    out.weight[i][o] = v
                if not math.isclose(w, 1.0):
                    weights[f"{kind} {name}"] = w
    if s.kv_se:
        for b, bits in enumerate(s.kv_options):
            col, w = shrink([row[b] for row in s.kv], [row[b] for row in s.kv_se])
            for layer, v in enumerate(col):
                out.kv[layer][b] = v
            if not math.isclose(w, 1.0):
                weights[f"KV {'bf16' if bits is None else f'int{bits}'}"] = w
    w_order = sorted(range(len(s.options)), key=lambda i: PRECISION_ORDER.get(s.options[i], 99))
    kv_order = sorted(range(len(s.kv_options)), key=lambda i: KV_ORDER.get(s.kv_options[i], 99))
    out.weight = [monotone(row, w_order) for row in out.weight]
    out.kv = [monotone(row, kv_order) for row in out.kv]
    out.prune = [max(0.0, v) for v in s.prune]
    out.calibration = {**s.calibration, "shrinkage": weights}
    return out
