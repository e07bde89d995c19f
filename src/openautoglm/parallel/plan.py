"""The tensor-parallel plan: which heads, MLP features and vocabulary rows one rank holds. Pure: no communication.

Megatron-style split of a Llama-family decoder (Shoeybi et al., 2019, sec. 3): q/k/v column-parallel by heads
and ``o_proj`` row-parallel; ``gate``/``up`` column-parallel and ``down`` row-parallel; the embedding and
``lm_head`` by vocabulary rows. Each row-parallel output is summed over the ranks (one all-reduce per layer).

Heads: rank ``r`` holds a contiguous block of query heads and the KV heads they read -- ``n_kv / tp`` whole GQA
groups when ``tp`` divides the KV heads, one KV head (replicated on ``tp / n_kv`` ranks) when it is a multiple
of them. Cuts land on head boundaries and on every boundary the (quantized) layers need (:func:`.slicing.granularity`:
quantization groups, packed bytes). A split that cannot be even is an error naming the layer, unless
``allow_uneven``: then the parts are as balanced as the boundaries allow (pruned models with uneven GQA
groups, a ``tp`` that does not divide the heads); any such split is correct, because every query head lives on
exactly one rank together with the KV head it reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from .. import _hf
from .config import ShardConfig
from .slicing import DROP, TensorCut, granularity, module_slices, sliced_bytes


@dataclass(frozen=True)
class Cut:
    """A rank holds features ``[start, stop)`` of a module along ``dim`` (``"out"`` rows or ``"in"`` columns)."""

    dim: str
    start: int
    stop: int


@dataclass
class LayerSplit:
    """One decoder layer on one rank: query / KV head ranges, local GQA map, MLP feature range."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    kv_index: list[int]
    mlp: tuple[int, int]

    @property
    def n_q(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass
class ShardPlan:
    """What rank ``rank`` of ``tp_size`` holds. ``tensors`` maps every state-dict key that is cut (or dropped) to its
    :class:`~.slicing.Slice` (or ``DROP``); keys not listed are replicated whole."""

    tp_size: int
    rank: int
    config: ShardConfig
    layers: list[LayerSplit]
    cuts: dict[str, Cut]
    row_parallel: list[str]
    vocab: tuple[int, int] | None
    embedding: str | None
    lm_head: str | None
    tied: bool
    tensors: dict[str, TensorCut] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def module_tensors(self, name: str) -> dict[str, TensorCut]:
        """Cuts of the tensors of module ``name``, keyed by their names inside it."""
        p = name + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def held(self, model: nn.Module) -> dict[str, int]:
        """Bytes this rank holds of ``model`` (unsharded, real or meta): ``{"bytes", "float_params", "other_bytes"}``.

        Counted like :func:`openautoglm.memory.estimate.model_bytes` (parameters and buffers, tied ones once);
        ``float_params`` are the trainable floating-point elements (they follow a requested dtype).
        """
        total = fl = fl_bytes = 0
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            b = sliced_bytes(tuple(t.shape), t.element_size(), self.tensors.get(name))
            total += b
            if t.is_floating_point() and t.requires_grad:
                fl += b // t.element_size()
                fl_bytes += b
        return {"bytes": total, "float_params": fl, "other_bytes": total - fl_bytes}

    def summary(self) -> dict:
        return {"tp_size": self.tp_size, "rank": self.rank, "config": self.config.to_dict(), "vocab": self.vocab,
                "q_heads": [s.n_q for s in self.layers], "kv_heads": [s.n_kv for s in self.layers],
                "mlp": [s.mlp[1] - s.mlp[0] for s in self.layers], "notes": self.notes}


# ----------------------------------------------------------------------------- boundaries

def _heads_alignment(head_dim: int, mods: list[tuple[nn.Module, str]]) -> int:
    """Smallest number of heads whose features every module in ``mods`` can be cut at."""
    a = 1
    for mod, dim in mods:
        g = granularity(mod, dim)
        a = math.lcm(a, g // math.gcd(g, head_dim))
    return a


def _why(mod: nn.Module, dim: str) -> str:
    fn = getattr(mod, "_granularity_reason", None)
    return fn(dim).strip(" ()") if callable(fn) else "its layout"


def _even(n: int, tp: int, align: int) -> list[int] | None:
    if n % tp or (n // tp) % align:
        return None
    return [r * n // tp for r in range(tp + 1)]


def _balanced(n: int, tp: int, align: int, what: str) -> list[int]:
    """Boundaries at multiples of ``align`` (the last at ``n``), as close to ``r n / tp`` as they can be."""
    units = -(-n // align)  # the last unit may be short
    if units < tp:
        raise ValueError(f"{what}: cannot give each of {tp} ranks a part cut at multiples of {align} "
                         f"(only {units} such parts in {n}); use a smaller tp_size")
    return [0] + [math.floor(r * units / tp + 0.5) * align for r in range(1, tp)] + [n]


# ----------------------------------------------------------------------------- the plan

def _split_heads(i: int, attn: nn.Module, tp: int, allow_uneven: bool) -> list[tuple[int, int, int, int, list[int]]]:
    """Per rank: (q0, q1, kv0, kv1, local kv_index) of layer ``i``."""
    layout = _hf.attention_layout(attn)
    hd, n_q, n_kv = int(attn.head_dim), len(layout), max(layout) + 1
    a_q = _heads_alignment(hd, [(attn.q_proj, "out"), (attn.o_proj, "in")])

    def parts(bounds):
        out = []
        for q0, q1 in zip(bounds, bounds[1:]):
            lo, hi = layout[q0], layout[q1 - 1] + 1
            out.append((q0, q1, lo, hi, [h - lo for h in layout[q0:q1]]))
        return out

    bounds, problem = _even(n_q, tp, a_q), None
    if bounds is None:
        problem = (f"tp_size={tp} does not divide its {n_q} query heads" if n_q % tp else
                   f"{n_q // tp} query heads per rank ({n_q // tp * hd} features) do not fall on the boundaries "
                   f"of {a_q} heads that q_proj/o_proj need ({_why(attn.o_proj, 'in')})")
    else:
        ps = parts(bounds)
        groups = [[loc.count(g) for g in range(max(loc) + 1)] for *_, loc in ps]
        if len({len(g) for g in groups}) > 1 or any(len(set(g)) > 1 for g in groups):
            uneven = len(set(layout.count(g) for g in range(n_kv))) > 1
            problem = (f"its GQA groups are uneven (pruned: {[layout.count(g) for g in range(n_kv)]} query heads "
                       f"per KV head)" if uneven else
                       f"tp_size={tp} splits its {n_kv} KV heads unevenly (tp_size must divide them or be a "
                       "multiple of them)")
    if problem:
        if not allow_uneven:
            raise ValueError(f"cannot split layer {i} ({n_q} query / {n_kv} KV heads) over {tp} ranks: {problem}; "
                             "use a tp_size that divides the heads, or ShardConfig(allow_uneven=True) for a correct "
                             "but unbalanced split")
        bounds = _balanced(n_q, tp, a_q, f"layer {i} attention ({n_q} query heads)")
    ps = parts(bounds)
    a_kv = _heads_alignment(hd, [(attn.k_proj, "out"), (attn.v_proj, "out")])
    for q0, q1, lo, hi, _ in ps:
        if lo % a_kv or hi % a_kv:
            raise ValueError(f"cannot split layer {i}: KV heads [{lo}, {hi}) do not fall on the boundaries of "
                             f"{a_kv} heads that k_proj/v_proj need ({_why(attn.k_proj, 'out')})")
    return ps


def _split_mlp(i: int, gate: nn.Module, up: nn.Module, down: nn.Module, tp: int, allow_uneven: bool) -> list[int]:
    n = gate.out_features
    if up.out_features != n or down.in_features != n:
        raise ValueError(f"layer {i} MLP: gate/up/down widths differ ({n}, {up.out_features}, {down.in_features})")
    a = math.lcm(granularity(gate, "out"), granularity(up, "out"), granularity(down, "in"))
    bounds = _even(n, tp, a)
    if bounds is not None:
        return bounds
    ok = [t for t in range(2, 9) if _even(n, t, a)]
    msg = (f"layer {i} MLP: {n} intermediate features split {tp} ways ({n / tp:g} each) do not fall on the "
           f"{a}-feature boundaries its projections need ({_why(down, 'in') if a > 1 else 'whole features'})")
    if not allow_uneven:
        raise ValueError(f"cannot split {msg}; row-parallel layers must be cut at group boundaries: use a tp_size in "
                         f"{ok or 'none up to 8'}, a smaller quantization group, or ShardConfig(allow_uneven=True) "
                         f"(unequal parts cut at multiples of {a})")
    return _balanced(n, tp, a, msg)


def _vocab_split(model: nn.Module, tp: int, config: ShardConfig, notes: list[str]):
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = emb is not None and head is not None and getattr(head, "weight", None) is emb.weight
    if tp == 1 or config.vocab == "replicate" or emb is None:
        return emb, head, tied, None
    v, reason = emb.num_embeddings if hasattr(emb, "num_embeddings") else 0, None
    if type(emb) is not nn.Embedding:
        reason = f"the input embedding is a {type(emb).__name__}, not an nn.Embedding"
    elif v % tp:
        reason = f"tp_size={tp} does not divide the vocabulary of {v}"
    elif head is not None and getattr(head, "out_features", None) != v:
        reason = f"lm_head has {getattr(head, 'out_features', '?')} outputs, the embedding {v} rows"
    elif head is not None:
        try:
            g = granularity(head, "out")
            if (v // tp) % g:
                reason = f"lm_head can only be cut at multiples of {g} rows"
        except TypeError as e:
            reason = str(e)
    if reason:
        notes.append(f"embedding and lm_head replicated: {reason}")
        return emb, head, tied, None
    return emb, head, tied, v // tp


def make_plan(model: nn.Module, tp_size: int, rank: int = 0, config: ShardConfig | None = None) -> ShardPlan:
    """The plan of rank ``rank`` among ``tp_size`` for ``model`` (real or meta-device; left untouched).

    Raises ``TypeError`` for an architecture it cannot split (no Llama-style attention / gated MLP, an unknown
    module type) and ``ValueError`` naming the layer when the split cannot be made (see module docstring).
    """
    config = ShardConfig.resolve(tp_size, config)
    tp = config.tp_size
    if tp is None:
        raise ValueError("make_plan needs tp_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp:
        raise ValueError(f"rank={rank!r} must be an integer in [0, {tp})")
    names = {id(m): n for n, m in model.named_modules()}
    cuts: dict[str, Cut] = {}
    row: list[str] = []
    layers: list[LayerSplit] = []
    notes: list[str] = []
    for (i, attn), (_, gate, up, down) in zip(_hf.separate_qkv_attention_modules(model), _hf.mlp_projections(model)):
        q0, q1, kv0, kv1, local = _split_heads(i, attn, tp, config.allow_uneven)[rank]
        mb = _split_mlp(i, gate, up, down, tp, config.allow_uneven)
        m0, m1 = mb[rank], mb[rank + 1]
        hd = int(attn.head_dim)
        for mod, cut in ((attn.q_proj, Cut("out", q0 * hd, q1 * hd)), (attn.k_proj, Cut("out", kv0 * hd, kv1 * hd)),
                         (attn.v_proj, Cut("out", kv0 * hd, kv1 * hd)), (attn.o_proj, Cut("in", q0 * hd, q1 * hd)),
                         (gate, Cut("out", m0, m1)), (up, Cut("out", m0, m1)), (down, Cut("in", m0, m1))):
            cuts[names[id(mod)]] = cut
        row += [names[id(attn.o_proj)], names[id(down)]]
        layers.append(LayerSplit((q0, q1), (kv0, kv1), local, (m0, m1)))
    emb, head, tied, per = _vocab_split(model, tp, config, notes)
    vocab = None if per is None else (rank * per, (rank + 1) * per)
    if vocab is not None:
        cuts[names[id(emb)]] = Cut("out", *vocab)
        if head is not None:
            cuts[names[id(head)]] = Cut("out", *vocab)
    plan = ShardPlan(tp, rank, config, layers, cuts, row, vocab, names.get(id(emb)), names.get(id(head)),
                     tied, notes=notes)
    for name, cut in cuts.items():
        for k, sl in module_slices(model.get_submodule(name), cut.dim, cut.start, cut.stop).items():
            if name in row and k.rpartition(".")[2] == "bias" and rank != 0:
                sl = DROP  # a row-parallel bias is added once, after the sum: on rank 0
            plan.tensors[f"{name}.{k}"] = sl
    return plan
