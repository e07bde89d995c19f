"""Second-order sensitivities from one forward/backward pass per calibration batch (the default of the search).

:mod:`.sensitivity` measures each single change with a full evaluation of the calibration text: one per
(unit, option), per (layer, KV width) and per (layer, groups pruned) -- 261 evaluations for a 270M model, hours
on a CPU. Here every one of those NLL increases is *predicted* from the quantities a single backward pass gives,
with the Fisher (Gauss-Newton) approximation of the loss curvature in each perturbed tensor's own space, as
BRECQ (Li et al., 2021, eq. 10) does for block outputs and HAWQ-V2 (Dong et al., 2020) for weights:

    dL ~= g . d + 1/2 sum_i g_i^2 d_i^2

where ``d`` is what the change does to a tensor ``z`` of the forward pass and ``g = dL/dz`` (``L`` the summed
token NLL of a window). Per change:

* **weight unit, option o** -- ``z`` = the output of each of the unit's Linears, ``d = q_o(x) - W x`` computed
  from the saved input ``x`` with the real quantized module (activation rounding included); second-order term
  only (quantization noise is uncorrelated with ``g``: its first-order term is zero-mean noise); a MoE layer's
  routed experts likewise, ``z`` their output and ``d`` the quantized experts' output minus it for the same routing;
* **KV layer l at b bits** -- the attention scores (``d = q . (K_b - K)`` for the positions a token-by-token
  KIVI decode reads dequantized, :func:`openautoglm.kv.emulate.dequantized`) and the attention output
  (``d = P_dequantized . (V_b - V)``); second-order terms;
* **k GQA groups of layer l pruned** (least important first, the Taylor order of :mod:`.pruning`) -- ``z`` =
  the input of ``o_proj``, ``d = -z`` on the removed heads' channels; first- and second-order terms (removing
  a head is not zero-mean).

All of them for all units, options, layers and widths come out of the same pass: each option costs one
quantized Linear forward and each KV width two attention-sized products, no extra evaluation of the text.
Per-window values give the standard errors the search's denoising uses. The predictions are a first
approximation; :func:`.api.compress_to_budget` calibrates them per kind on a few measured uniform changes and
verifies its short list by real evaluations, as before.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import _hf
from ..kv.emulate import dequantized
from ..kv.layout import resolve_residual
from ..quant.api import new_quantized, supports
from .space import Unit, WeightOption

log = logging.getLogger(__name__)
MAX_SEQ = 512  # tokens per window of the pass (memory: every layer's (heads, T, T) probabilities are kept)


class _Acc:
    """Per-window sums ``[key] -> (n_windows,)`` float64 tensors."""

    def __init__(self, n: int):
        self.n, self.d = n, {}

    def add(self, key, lo: int, per_window: torch.Tensor) -> None:
        row = self.d.setdefault(key, torch.zeros(self.n, dtype=torch.float64))
        row[lo:lo + per_window.numel()] += per_window.detach().double().cpu()

    def get(self, key) -> torch.Tensor:
        return self.d.get(key, torch.zeros(self.n, dtype=torch.float64))


def _rowsum(t: torch.Tensor) -> torch.Tensor:
    return t.float().flatten(1).sum(1)


class FisherPass:
    """Hooks that turn one forward/backward pass into the predicted NLL increase of every single change."""

    def __init__(self, model: nn.Module, units: list[Unit], options: list[WeightOption], kv_options, orders,
                 max_k: list[int], *, kv_group: int, kv_residual, seq_len: int, n_windows: int):
        self.model, self.units, self.options = model, units, options
        self.kv_bits = [b for b in kv_options if b is not None]
        self.orders, self.max_k = orders, max_k
        self.kv_group, self.seq = kv_group, seq_len
        self.residual = {b: resolve_residual(kv_residual, kv_group, seq_len, b) for b in self.kv_bits}
        self.acc = _Acc(n_windows)
        self.lo = 0  # first window of the batch in flight
        self.nb = 1  # windows in the batch in flight
        self._qmods: dict[tuple[str, int], nn.Module | None] = {}

    # ------------------------------------------------------------------ weights
    def _qmod(self, name: str, lin: nn.Module, o: int):
        key = (name, o)
        if key not in self._qmods:
            cfg = self.options[o].config([name])
            self._qmods[key] = None if supports(lin, cfg) else new_quantized(lin, cfg)
        return self._qmods[key]

    def _experts_hook(self, unit: int, name: str):
        """A MoE layer's routed experts: ``z`` = their output ``(tokens, h)``, ``d = q_o(x) - experts(x)`` for the
        same routing (the quantized experts run on the saved inputs); second-order term, as for Linears."""
        opts = [o for o, opt in enumerate(self.options) if opt.scheme is not None]

        def fwd(mod, inp, out):
            x, idx, w = (t.detach() for t in inp[:3])
            lo, nb, y = self.lo, self.nb, out.detach()

            def bwd(g):
                with torch.no_grad():
                    g2 = g.float().reshape(nb, -1) ** 2
                    for o in opts:
                        q = self._qmod(name, mod, o)
                        if q is not None:
                            d = (q(x, idx, w) - y).float().reshape(nb, -1)
                            self.acc.add(("w", unit, o), lo, 0.5 * _rowsum(g2 * d * d))
            if out.requires_grad:
                out.register_hook(bwd)
        return fwd

    def _linear_hook(self, unit: int, name: str):
        opts = [o for o, opt in enumerate(self.options) if opt.scheme is not None]

        def fwd(mod, inp, out):
            x, lo = inp[0].detach(), self.lo

            def bwd(g):
                with torch.no_grad():
                    y = F.linear(x, mod.weight, mod.bias)
                    g2 = g.float() ** 2
                    for o in opts:
                        q = self._qmod(name, mod, o)
                        if q is not None:
                            d = (q(x) - y).float()
                            self.acc.add(("w", unit, o), lo, 0.5 * _rowsum(g2 * d * d))
            if out.requires_grad:
                out.register_hook(bwd)
        return fwd

    # ------------------------------------------------------------------ KV and attention
    def _attention(self, layer: int):
        bits_list, group = self.kv_bits, self.kv_group

        def fn(module, query, key, value, attention_mask, scaling=None, **kwargs):
            b, hq, T, d = query.shape
            lo = self.lo
            idx = torch.tensor(_hf.attention_layout(module), device=key.device)
            K, V = key.index_select(1, idx), value.index_select(1, idx)
            scaling = scaling if scaling is not None else d ** -0.5
            pos = torch.arange(T, device=query.device)
            causal = pos[None, :] <= pos[:, None]
            scores = (query @ K.transpose(-1, -2)) * scaling
            scores = scores.float().masked_fill(~causal, float("-inf"))
            p = torch.softmax(scores, dim=-1)
            out = (p.to(V.dtype) @ V)
            if bits_list and scores.requires_grad:
                q_d, k_d, v_d, p_d = query.detach(), key.detach(), value.detach(), p.detach()

                def on_scores(gs):
                    with torch.no_grad():
                        g2 = gs.float().masked_fill(~causal, 0.0) ** 2
                        for bits in bits_list:
                            kq, _ = dequantized(k_d, v_d, bits, group)
                            dk = (kq - k_d).index_select(1, idx)
                            use = _dequantized_positions(pos, self.residual[bits], group)
                            ds = ((q_d @ dk.transpose(-1, -2)) * scaling).float() * use
                            self.acc.add(("kv", layer, bits), lo, 0.5 * _rowsum(g2 * ds * ds))

                def on_out(go):
                    with torch.no_grad():
                        g2 = go.float() ** 2
                        for bits in bits_list:
                            _, vq = dequantized(k_d, v_d, bits, group)
                            dv = (vq - v_d).index_select(1, idx)
                            use = _dequantized_positions(pos, self.residual[bits], group)
                            do = ((p_d * use) @ dv.float())
                            self.acc.add(("kv", layer, bits), lo, 0.5 * _rowsum(g2 * do * do))

                scores.register_hook(on_scores)
                out.register_hook(on_out)
            return out.transpose(1, 2).contiguous(), None

        return fn

    def _prune_hook(self, layer: int, head_dim: int):
        order, kmax = self.orders[layer], self.max_k[layer]

        def pre(mod, args):
            x, lo = args[0], self.lo
            if not x.requires_grad or not kmax:
                return None
            xd = x.detach()

            def bwd(g):
                with torch.no_grad():
                    gf, xf = g.float(), xd.float()
                    total = None
                    for k in range(1, kmax + 1):
                        cols = [c for h in order[k - 1] for c in range(h * head_dim, (h + 1) * head_dim)]
                        idx = torch.tensor(cols, device=xf.device)
                        gk, xk = gf.index_select(-1, idx), xf.index_select(-1, idx)
                        part = _rowsum(-gk * xk) + 0.5 * _rowsum(gk * gk * xk * xk)
                        total = part if total is None else total + part
                        self.acc.add(("prune", layer, k), lo, total)
            x.register_hook(bwd)
            return None
        return pre

    # ------------------------------------------------------------------ the pass
    @contextlib.contextmanager
    def installed(self):
        handles = []
        with contextlib.ExitStack() as stack:
            emb = self.model.get_input_embeddings()
            handles.append(emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
            for u, unit in enumerate(self.units):
                for name in unit.modules:
                    mod = self.model.get_submodule(name)
                    hook = self._experts_hook(u, name) if _hf.moe.is_experts(mod) else self._linear_hook(u, name)
                    handles.append(mod.register_forward_hook(hook))
            for layer, attn in _hf.attention_modules(self.model):
                stack.enter_context(_hf.override_attention(attn, self._attention(layer)))
                o_proj = _hf.output_projection(attn)
                if self.orders and isinstance(o_proj, nn.Linear):
                    hd = _hf.head_dim(self.model.config)
                    handles.append(o_proj.register_forward_pre_hook(self._prune_hook(layer, hd)))
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()

    def run(self, windows: torch.Tensor, batch_size: int, bar=None) -> torch.Tensor:
        """Forward + backward over ``windows (n, seq)``; returns each window's mean NLL (the base)."""
        dev = next(self.model.parameters()).device
        base = torch.zeros(windows.shape[0], dtype=torch.float64)
        flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients flow through activations only: no weight gradients held
        was_training = self.model.training
        self.model.eval()
        try:
            with self.installed(), torch.enable_grad():
                for lo in range(0, windows.shape[0], batch_size):
                    self.lo = lo
                    ids = windows[lo:lo + batch_size].to(dev)
                    self.nb = ids.shape[0]
                    logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                          reduction="none").view(ids.shape[0], -1)
                    base[lo:lo + ids.shape[0]] = nll.mean(1).detach().double().cpu()
                    nll.sum().backward()
                    if bar is not None:
                        bar.update(ids.shape[0])
        finally:
            for p, f in zip(self.model.parameters(), flags):
                p.requires_grad_(f)
            self.model.train(was_training)
        return base


def _dequantized_positions(pos: torch.Tensor, residual: int, group: int) -> torch.Tensor:
    """``(T, T)`` 1.0 where query ``t`` reads key ``s`` dequantized in a token-by-token KIVI decode
    (``s < n_q(t)``, see :mod:`openautoglm.kv.emulate`), else 0.0."""
    n_q = ((pos + 1 - residual).clamp_min(0) // group) * group
    return (pos[None, :] < n_q[:, None]).float()


def fisher_signals(model: nn.Module, windows: torch.Tensor, units: list[Unit], options: list[WeightOption], kv_options,
                   orders, max_k: list[int], *, kv_group: int = 64, kv_residual="auto", batch_size: int = 1,
                   progress: bool = True):
    """Predicted single-change NLL increases (nats/token) and their standard errors between windows.

    Returns ``(base_nll, weight[unit][option], weight_se, kv[layer][kv option], kv_se, layer_prune[layer][k],
    seconds)``; ``inf`` where an option does not apply to a unit (a shape its scheme refuses)."""
    t0 = time.perf_counter()
    seq_full = windows.shape[1]
    if seq_full > MAX_SEQ and seq_full % MAX_SEQ == 0:  # the same tokens in shorter windows: the pass keeps the
        windows = windows.reshape(-1, MAX_SEQ)            # attention probabilities of every layer for backward
    n, seq = windows.shape
    fp = FisherPass(model, units, options, kv_options, orders, max_k, kv_group=kv_group, kv_residual=kv_residual,
                    seq_len=seq_full, n_windows=n)
    bar = tqdm(total=n, desc="sensitivity (one backward pass)", unit="window", disable=not progress)
    base_w = fp.run(windows, batch_size, bar)
    bar.close()
    tokens = seq - 1

    def stat(key) -> tuple[float, float]:
        v = fp.acc.get(key) / tokens
        return float(v.mean()), (float(v.std(unbiased=True)) / n ** 0.5 if n > 1 else 0.0)

    weight, weight_se = [], []
    for u, unit in enumerate(units):
        row, ses = [], []
        for o, opt in enumerate(options):
            if opt.scheme is None:
                row.append(0.0)
                ses.append(0.0)
            elif any(fp._qmods.get((name, o), 0) is None for name in unit.modules):
                row.append(float("inf"))
                ses.append(0.0)
            else:
                m, se = stat(("w", u, o))
                row.append(m)
                ses.append(se)
        weight.append(row)
        weight_se.append(ses)
    n_layers = len(_hf.decoder_layers(model))
    kv, kv_se = [], []
    for layer in range(n_layers):
        row, ses = [], []
        for b in kv_options:
            m, se = (0.0, 0.0) if b is None else stat(("kv", layer, b))
            row.append(m)
            ses.append(se)
        kv.append(row)
        kv_se.append(ses)
    layer_prune = [[0.0] + [max(0.0, stat(("prune", layer, k))[0]) for k in range(1, (max_k[layer] if max_k else 0) + 1)]
                   for layer in range(n_layers)] if orders else [[0.0] for _ in range(n_layers)]
    return (float(base_w.mean()), weight, weight_se, kv, kv_se, layer_prune, time.perf_counter() - t0)
