"""Analytic memory model: ``estimate_memory(model_or_config_or_path, mode=..., ...) -> MemoryEstimate``.

Each term is one formula (bytes), with its source:

* weights: parameters x bytes as stored (exact, from the meta-device model; quantized layers as
  ``n bits / 8 + scales``); under autocast the fp32 parameters are the *master weights* and the low-precision
  copies autocast caches for every Linear (2 B/param) are the *weights*.
* gradients: one per trainable parameter, in the parameter dtype (PyTorch ``.grad``).
* optimizer states: AdamW 2 tensors/param in the parameter dtype (so fp32 master + fp32 grads + Adam m, v =
  16 B/param: Rajbhandari et al. 2020, ZeRO, sec. 3.1), SGD-momentum 1, Adafactor rows+cols (Shazeer & Stern 2018);
  ``step()`` temporaries by implementation (foreach: a copy of the parameters; fused: none): ``optimizers.py``.
* activations: per-layer saved tensors (``formulas.py``, after Korthikanti et al. 2022 adjusted for SDPA/flash),
  or only each layer's input under activation checkpointing (Chen et al. 2016) plus one recomputed layer.
* KV cache: ``2 x layers x kv_heads x head_dim x tokens x batch x bytes`` (+ scales for quantized caches).
* logits: ``tokens x vocab x (cb + 4 + 4)`` in forward (logits, their fp32 upcast for the loss, log-softmax
  saved by cross-entropy) and ``12 x tokens x vocab`` at the start of backward (log-softmax, nll grad, its grad).

The peak is found by walking the step's timeline (forward end, loss backward, each layer's backward,
embedding backward, optimizer step) and keeping the largest total; the breakdown is the one at that moment.
Library workspaces (cuBLAS) and the CUDA context are not counted (``torch.cuda.max_memory_allocated``
counts the former once per process; neither scales with the model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _hf
from ..parallel.plan import make_plan
from ..units import format_bytes
from . import formulas as F
from . import mixed
from . import optimizers as O
from .formulas import LayerShape
from .shapes import ModelShape, _to_model, model_shape
from .sizes import (  # noqa: F401  (dtype_bytes, model_bytes, kv_cache_bytes: public here too)
    _kv_bytes,
    _quant_spec,
    dtype_bytes,
    kv_cache_bytes,
    model_bytes,
    quantized_weight_bytes,
)

MODES = ("inference", "train")
AMP = ("bf16", "fp16", "none")
OPTIMIZERS = tuple(O.NAMES)
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
TERMS = ("weights", "master_weights", "gradients", "optimizer_states", "activations", "kv_cache", "logits", "workspace")


@dataclass
class MemoryEstimate:
    """Bytes per term at the peak moment (``phase``), the total, and each term's formula."""

    mode: str
    settings: dict[str, Any]
    terms: dict[str, int]
    phase: str
    phases: dict[str, int] = field(default_factory=dict)     # total at each moment of the timeline
    formulas: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()))

    def __getattr__(self, name: str):
        terms = self.__dict__.get("terms", {})
        if name in terms:
            return terms[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}

    def rows(self, measured: dict[str, int] | None = None) -> list[list[str]]:
        rows = []
        for k in TERMS:
            v = self.terms.get(k, 0)
            if v or (measured and measured.get(k)):
                row = [k.replace("_", " "), format_bytes(v), f"{100 * v / max(1, self.total):.1f}%", self.formulas.get(k, "")]
                if measured is not None:
                    row.insert(2, format_bytes(measured[k]) if k in measured else "")
                rows.append(row)
        total = ["total", format_bytes(self.total), "100%", f"peak at: {self.phase}"]
        if measured is not None:
            total.insert(2, format_bytes(measured["total"]) if "total" in measured else "")
        return rows + [total]

    def table(self, title: str | None = None, measured: dict[str, int] | None = None):
        """A rich Table (the CLI prints it); ``measured`` adds a column (see MemoryProfiler.breakdown)."""
        from rich.table import Table

        cols = ["term", "estimate", "share", "formula"]
        if measured is not None:
            cols.insert(2, "measured")
        t = Table(title=title or f"memory estimate ({self.mode})", title_justify="left")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in self.rows(measured):
            t.add_row(*r)
        return t

    def __str__(self) -> str:
        return "\n".join(" | ".join(r) for r in self.rows())


def estimate_memory(
    model_or_config_or_path,
    mode: str = "inference",
    batch: int = 1,
    seq_len: int = 2048,
    dtype: str | torch.dtype | None = None,
    kv_dtype: str | None = None,
    quantization=None,
    optimizer="adamw",
    amp: str | None = None,
    grad_checkpointing: bool = False,
    grad_accum: int = 1,
    tp_degree: int = 1,
    logits: str | None = None,
    kv_group_size: int = 64,
    kv_residual: int | str = "auto",
    kv_shared_layers: int = 0,
    kv_static: bool = False,
    device: str | torch.device | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of inference (prefill of ``seq_len`` tokens with a KV cache) or of one
    training step of :func:`openautoglm.training.loop.train` (steady state, optimizer states allocated).

    Parameters
    ----------
    model_or_config_or_path : model, transformers config, config dict, shipped name or folder (meta device).
    mode : ``"inference"`` or ``"train"``.
    batch, seq_len : sequences per forward (the micro-batch in training) and tokens per sequence.
    dtype : parameter dtype (default: the checkpoint's; ``train`` with ``amp`` uses fp32 master weights).
    kv_dtype : KV cache element type: bf16, fp16, fp32, fp8, int8, int4, int2 (default: ``dtype``), or a list
        with one entry per decoder layer (bits 8/4/2 or names; None = full precision) for a per-layer cache.
    quantization : weight quantization, e.g. ``"w4"``, ``{"bits": 4, "group_size": 128}`` (inference only), or
        a per-module recipe: a list of ``QuantConfig`` (or their dicts) with include/exclude patterns, each
        Linear taking the first config that selects it (:mod:`.mixed`; weight bytes exact, meta device).
    optimizer : ``"adamw"`` = what ``torch.optim.AdamW(params)`` runs by default on ``device`` (foreach on CUDA,
        for-loop on CPU); ``"adamw_fused"``, ``"adamw_foreach"``, ``"adamw_forloop"`` pin the implementation;
        ``"sgd"`` (momentum), ``"adafactor"``; or a live ``torch.optim`` optimizer, whose settings
        (fused/foreach/capturable/amsgrad), parameter groups and state tensors are read (:mod:`.optimizers`).
    amp : ``"bf16"``/``"fp16"`` autocast with fp32 master weights, ``None``/``"none"`` (train in ``dtype``).
    grad_checkpointing : activation checkpointing of every decoder layer (non-reentrant).
    grad_accum : micro-batches per optimizer step (grads of earlier micro-batches stay allocated).
    tp_degree : tensor-parallel degree (Megatron column/row sharding of attention, MLP and vocabulary).
    logits : ``"all"`` positions or ``"last"`` (default: last for inference, as ``generate`` does; all for train).
        Inference peaks either in the decoder layers or at ``lm_head`` (the logits come after the layers' transients
        are freed): a plain ``model(ids)`` forward returns every position's logits, so estimate it with ``"all"``.
    kv_group_size, kv_residual : quantized KV cache groups and full-precision recent window (KIVI-style;
        ``"auto"``, the default: sized to ``seq_len`` as ``openautoglm.kv``'s caches do by default).
    kv_static : the quantized cache is preallocated for ``seq_len`` tokens (compiled decode, ``Generator(kv=...)``).
    kv_shared_layers : layers whose K/V blocks are freed by cross-layer KV sharing (they reuse a neighbour's).
    device : where training runs (default ``"cuda"``, or the optimizer's parameters' device): decides torch's
        default optimizer implementation; at inference, where quantized layers run (their prefill transients differ).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; accepted: {', '.join(MODES)}")
    if logits not in (None, "last", "all"):
        raise ValueError(f"logits={logits!r}; accepted: 'last' (generate's prefill), 'all' (a plain forward)")
    if not isinstance(kv_shared_layers, int) or kv_shared_layers < 0:
        raise ValueError(f"kv_shared_layers={kv_shared_layers!r} must be an integer >= 0")
    for name, v in (("batch", batch), ("seq_len", seq_len), ("grad_accum", grad_accum), ("tp_degree", tp_degree)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    amp = "none" if amp in (None, False, "none", "fp32") else amp
    if amp not in AMP:
        raise ValueError(f"amp={amp!r}; accepted: bf16, fp16, none")
    O.check_device(device)
    opt_spec = O.resolve(optimizer, device)
    configs = mixed.as_config_list(quantization)
    if configs is not None:  # per-module recipe: rebuild the model on the meta device with those modules
        if mode == "train":
            raise ValueError("training a quantized model is not supported; estimate mode='inference' or drop quantization")
        if isinstance(model_or_config_or_path, ModelShape):
            raise TypeError("a per-module quantization list needs the model, its config or its path, not a ModelShape")
        want = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if want is None and isinstance(model_or_config_or_path, nn.Module):  # the model's own float dtype
            want = next((p.dtype for p in model_or_config_or_path.parameters() if p.is_floating_point()), None)
        meta = mixed.meta_copy(model_or_config_or_path, want)
        mixed.apply_quant_structure(meta, configs)
        model_or_config_or_path, quantization = meta, None
    s = model_or_config_or_path if isinstance(model_or_config_or_path, ModelShape) else model_shape(model_or_config_or_path)
    held = None if tp_degree == 1 or isinstance(model_or_config_or_path, ModelShape) else \
        _tp_held(model_or_config_or_path, tp_degree)
    if held is None:
        for L in s.layers:
            if L.heads % tp_degree or L.intermediate % tp_degree or (L.kv_heads % tp_degree and tp_degree % L.kv_heads):
                raise ValueError(f"tp_degree={tp_degree} does not divide heads {L.heads}/{L.kv_heads} or MLP width "
                                 f"{L.intermediate}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; accepted: {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    dtype = dtype or s.dtype
    autocast = mode == "train" and amp != "none"
    pdtype = torch.float32 if autocast else dtype
    pb = dtype_bytes(pdtype)                                    # parameter / grad / residual bytes
    cb = 2 if autocast else int(pb)                             # compute (activation) bytes
    spec = _quant_spec(quantization)
    recorded = [t for t in s.transforms if "quant" in str(t.get("type", ""))]
    if recorded and not s.quantized_modules and spec is None:  # recorded but not rebuilt here: count it analytically
        spec = _quant_spec(recorded[-1])
    if mode == "train" and (spec or recorded):
        raise ValueError("training a quantized model is not supported; estimate mode='inference' or drop quantization")
    kv_full = {2: "bf16" if dtype == torch.bfloat16 else "fp16", 4: "fp32"}[cb]
    kv_list = mixed.kv_dtype_list(kv_dtype, len(s.layers) - (kv_shared_layers if mode == "inference" else 0))
    kv_dtype = [d or kv_full for d in kv_list] if kv_list is not None else (kv_dtype or kv_full)
    tp = tp_degree
    # KV heads fewer than ranks are replicated: one per rank (as openautoglm.parallel splits them)
    layers = held["layers"] if held else [
        dataclasses.replace(L, heads=L.heads // tp, kv_heads=max(1, L.kv_heads // tp), intermediate=L.intermediate // tp)
        for L in s.layers]
    # openautoglm.parallel gathers the logits on every rank; the analytic (Megatron) split keeps 1/tp
    h, V, T = s.hidden, s.vocab if held or tp == 1 else s.vocab // tp, batch * seq_len
    shard = lambda n: n // tp  # noqa: E731  (Linear weights are sharded; norms and embeddings replicated here)
    lin = shard(sum(s.layer_linear_params)) + shard(s.head_params or (s.embed_params if s.tied else 0))
    float_params = s.float_params - sum(s.layer_linear_params) + shard(sum(s.layer_linear_params))
    settings = dict(model=s.name, mode=mode, batch=batch, seq_len=seq_len, dtype=str(dtype).replace("torch.", ""),
                    kv_dtype=kv_dtype, quantization=spec, optimizer=opt_spec.name, amp=amp,
                    grad_checkpointing=grad_checkpointing, grad_accum=grad_accum, tp_degree=tp, params=s.n_params)
    if kv_static:
        settings["kv_static"] = True
    fm: dict[str, str] = {}
    notes: list[str] = []
    if mode == "inference":
        if kv_shared_layers >= len(layers):
            raise ValueError(f"kv_shared_layers={kv_shared_layers} must be below the number of layers {len(layers)}")
        kv_layers = layers[: len(layers) - kv_shared_layers]
        return _inference(s, layers, kv_layers, spec, pb, cb, h, V, T, batch, seq_len, kv_dtype, kv_group_size, kv_residual,
                          logits or "last", float_params, settings, fm, notes, held,
                          device is None or torch.device(device).type != "cpu")
    return _train(s, layers, pb, cb, h, V, T, autocast, opt_spec, grad_checkpointing, grad_accum, lin,
                  float_params, settings, fm, notes)


def _tp_held(obj, tp: int) -> dict | None:
    """What the most loaded rank holds under :func:`openautoglm.parallel.make_plan` (weights, per-layer heads and
    MLP width: the maxima over ranks), or ``None`` for an architecture it cannot split (analytic split then)."""

    model, _ = _to_model(obj)
    try:
        plans = [make_plan(model, tp, r) for r in range(tp)]
    except TypeError:
        return None
    except ValueError as e:
        raise ValueError(f"tp_degree={tp}: {e}") from None
    held = max((p.held(model) for p in plans), key=lambda h: h["bytes"])
    hd = [int(a.head_dim) for _, a in _hf.attention_modules(model)]
    held["layers"] = [LayerShape(max(p.layers[i].n_q for p in plans), max(p.layers[i].n_kv for p in plans), hd[i],
                                 max(p.layers[i].mlp[1] - p.layers[i].mlp[0] for p in plans)) for i in range(len(hd))]
    return held


def _inference(s, layers, kv_layers, spec, pb, cb, h, V, T, batch, seq_len, kv_dtype, group, residual, logits, float_params,
               settings, fm, notes, held=None, cuda=True) -> MemoryEstimate:
    # float parameters follow the dtype; buffers and quantized codes/scales (frozen) stay as stored
    if held and not spec:
        w = int(held["float_params"] * pb + held["other_bytes"])
        fm["weights"] = (f"the most any of {settings['tp_degree']} ranks holds under openautoglm.parallel's plan: "
                         f"{held['float_params']:,} params x {pb:g} B + {held['other_bytes']:,} B as stored")
    else:
        w = int(float_params * pb + s.param_bytes - s.float_param_bytes)
        fm["weights"] = f"{float_params:,} params x {pb:g} B + {s.param_bytes - s.float_param_bytes:,} B as stored (buffers, quantized)"
    if spec:
        w, fm["weights"] = quantized_weight_bytes(s, spec, pb, w, settings["tp_degree"])
    static = settings.get("kv_static", False)
    if isinstance(kv_dtype, list):  # one KV element type per layer
        kv = sum(_kv_bytes([L], seq_len, batch, d, cb, group, residual, static) for L, d in zip(kv_layers, kv_dtype))
        names = ", ".join(f"{kv_dtype.count(d)} x {d}" for d in dict.fromkeys(kv_dtype))
        fm["kv_cache"] = f"sum over layers of 2 x kv heads x {layers[0].head_dim} x {T:,} tokens x its dtype ({names})"
        quantized_kv = any(d in ("int8", "int4", "int2") for d in kv_dtype)
    else:
        kv = _kv_bytes(kv_layers, seq_len, batch, kv_dtype, cb, group, residual, static)
        fm["kv_cache"] = f"2 x {len(kv_layers)} layers x {layers[0].kv_heads} kv heads x {layers[0].head_dim} x {T:,} tokens x {kv_dtype}"
        quantized_kv = kv_dtype in ("int8", "int4", "int2")
    if quantized_kv:
        fm["kv_cache"] += (f" (openautoglm KIVI store{', preallocated' if static else ''}: codes + fp16 "
                           f"scale/min per {group}-token key block and value group + full-precision window {residual})")
    trans = max(F.inference_layer_transient(L, h, cb, s.arch, seq_len, cuda) for L in layers)
    ids = 8 * T
    # Two moments of the forward; each holds the weights and the whole KV cache. In the decoder layers: the input
    # embeddings (alive until the model body returns), the residual stream and the largest layer transient. At
    # lm_head: the final normed hidden states and the logits -- every position's for a plain forward
    # (transformers' default logits_to_keep=0), the last one's for generate. The logits are not alive during the
    # layers, so the peak is the larger of the two, not their sum (a plain forward of a 1B GQA model at
    # 8 x 2048 measured 3.687 GB on the H100; layers + logits summed said 4.44, last-only said 3.39:
    # benchmarks/results/memory/bench_tinyllama.json).
    act = T * (2 * cb * h + trans) + ids
    n_logits = T if logits == "all" else batch
    lg = n_logits * V * cb
    head_act = T * cb * h + ids
    fm["activations"] = ("tokens x (input embeddings + residual (2 cb h) + max layer transient "
                         "(formulas.inference_layer_transient)) + ids")
    fm["logits"] = f"{'tokens' if logits == 'all' else 'batch (last position)'} x vocab {V:,} x {cb} B"
    body = {"weights": w, "kv_cache": kv, "activations": act, "logits": 0}
    head = {"weights": w, "kv_cache": kv, "activations": head_act, "logits": lg}
    ws = mixed.prefill_workspace(s, spec, T, n_logits, cb, h, layers, cuda)
    if ws:  # quantized layers: the decoder's largest transient at the layers, a quantized lm_head's at the head
        body["workspace"], head["workspace"], fm["workspace"] = ws
    phases = {"prefill: decoder layers": sum(body.values()), "prefill: lm_head": sum(head.values())}
    phase = max(phases, key=phases.get)
    terms = body if phase == "prefill: decoder layers" else head
    if phase == "prefill: lm_head":
        fm["activations"] = "tokens x final normed hidden state (cb h) + ids"
    if logits != "all":
        peak_all = max(phases["prefill: decoder layers"], phases["prefill: lm_head"] - lg + T * V * cb)
        notes.append(f"logits of the last position only, as generate() computes them; a plain model(ids) forward "
                     f"returns every position's: logits='all' peaks at {peak_all / 2**30:.2f} GiB")
    return MemoryEstimate("inference", settings, terms, phase, phases, fm, notes)


def _train(s, layers, pb, cb, h, V, T, autocast, optimizer, ckpt, accum, lin, float_params, settings, fm, notes):
    rb = int(pb)
    P = int(float_params * pb)
    S = optimizer.states(P, s.n_tensors, s.adafactor_elems)
    opt_temp = optimizer.step_temporaries(P, int(s.largest_matrix * pb), s.largest_matrix)
    fm["optimizer_states"], temp_formula = optimizer.formula()
    fm["optimizer_states"] = f"{optimizer.name}: {fm['optimizer_states']}"
    G = P
    Gl = [int(n * pb) for n in s.layer_params]
    G_emb, G_head = int(s.embed_params * pb), int(s.head_params * pb)
    Wl = [2 * n // settings["tp_degree"] for n in s.layer_linear_params] if autocast else [0] * len(layers)
    W_head = 2 * (lin - sum(Wl) // 2) if autocast else 0
    seq = settings["seq_len"]
    A = [F.layer_saved(L, h, rb, cb, autocast, s.arch, seq) * T for L in layers]
    A_attn = [F.layer_saved_attention_part(L, h, rb, cb, autocast, s.arch, seq) * T for L in layers]
    ck = [rb * h * T for _ in layers]
    fn = F.norm_saved(h, rb, cb, 1, autocast, s.arch) * T
    inputs = 24 * T
    emb_fwd = 0 if (autocast or ckpt) else rb * h * T
    Gp = G if accum > 1 else 0
    ev: dict[str, dict[str, int]] = {}

    def add(name, **t):
        ev[name] = t

    kept = (sum(ck) if ckpt else sum(A)) + (h * T if s.arch.dropout else 0)  # + embedding dropout mask
    W_all = sum(Wl) + W_head
    lg_fwd = T * V * (cb + (4 if cb < 4 else 0) + 4)
    add("forward end (loss)", master=P, states=S, grads=Gp, acts=kept + fn + emb_fwd, weights=W_all, logits=lg_fwd, ws=inputs)
    W_bwd = W_all if not ckpt else W_head
    add("backward: loss", master=P, states=S, grads=Gp, acts=kept + fn, weights=W_bwd, logits=12 * T * V, ws=inputs)
    g_head = G_head + (G_emb if s.tied else 0) + rb * h  # + final norm weight
    add("backward: lm_head", master=P, states=S, grads=max(Gp, g_head), acts=kept + fn, weights=W_bwd,
        logits=cb * T * V, ws=inputs + rb * h * T + (2 * (s.head_params or s.embed_params) if autocast else 0))
    n = len(layers)
    for l in range(n - 1, -1, -1):
        L = layers[l]
        done = Gp or (g_head + sum(Gl[l + 1:]))
        # checkpointed inputs of layers not yet done; under fp32 residuals layer l's input is its norm's saved input
        rem = sum(ck[: l + 1]) - (ck[l] if rb == 4 else 0) + A[l] if ckpt else sum(A[: l + 1])
        w = Wl[l] if ckpt else sum(Wl[: l + 1])
        peak_in = max(A[l] + F.mlp_backward_transient(L, h, rb, cb) * T,
                      A_attn[l] + F.attention_backward_transient(L, h, rb, cb) * T)
        big = h * max(L.intermediate, L.heads * L.head_dim,  # largest matrix of the layer: its grad is transient
                      L.moe.experts * L.moe.up if L.moe else 0)
        wgrad = (2 * big if autocast else 0) + (int(big * pb) if Gp else 0)
        done = done if Gp else done + int(big * pb)  # the layer's first weight grad (down_proj) exists at the peak
        if l in (n - 1, 0):
            add(f"backward: layer {l}", master=P, states=S, grads=done, acts=rem - A[l] + peak_in, weights=w, logits=0,
                ws=inputs + wgrad)
    emb_ws = 4 * h * T + (G_emb if s.tied else 0) + rb * h * T
    add("backward: embedding", master=P, states=S, grads=G, acts=0, weights=0, logits=0, ws=inputs + emb_ws)
    add("optimizer step", master=P, states=S, grads=G, acts=0, weights=0, logits=0, ws=opt_temp)
    settings.update(param_bytes=P, grad_bytes=G, optimizer_state_bytes=S)
    totals = {k: sum(v.values()) for k, v in ev.items()}
    phase = max(totals, key=totals.get)
    t = ev[phase]
    if autocast:
        terms = {"weights": t["weights"], "master_weights": t["master"]}
        fm["weights"] = "2 B x Linear params (autocast's cached low-precision weight copies alive then)"
        fm["master_weights"] = f"{float_params:,} params x 4 B (fp32)"
    else:
        terms = {"weights": t["master"] + t["weights"]}
        fm["weights"] = f"{float_params:,} params x {pb:g} B"
    terms.update(gradients=t["grads"], optimizer_states=t["states"], activations=t["acts"], logits=t["logits"], workspace=t["ws"])
    fm["gradients"] = "params x param bytes" + (" (earlier micro-batches' grads held: grad_accum > 1)" if accum > 1 else " (those produced so far)")
    fm["activations"] = ("checkpointed layer inputs (rb h) x layers x tokens + one recomputed layer" if ckpt else
                         "sum over layers of formulas.layer_saved x tokens") + " + final norm"
    fm["logits"] = "tokens x vocab x (cb + 4 + 4) fwd; 12 x tokens x vocab at loss backward"
    fm["workspace"] = ("ids/labels 24 B/token + backward transients" if phase != "optimizer step" else
                       f"optimizer step temporaries: {temp_formula}")
    if autocast and ckpt:
        notes.append("autocast caches the weight casts until the autocast region ends: all copies live at forward end")
    if any(L.cache is not None for L in layers):
        notes.append("multi-head latent attention (MLA) is priced as per-head attention in training: its low-rank "
                     "projections' saved activations are not modelled (tiny DeepSeek-V3: 30% low)")
    return MemoryEstimate("train", settings, terms, phase, totals, fm, notes)
