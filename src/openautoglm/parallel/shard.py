"""Module surgery: cut a model to one rank's part (:func:`apply_plan`) and wire its collectives (:func:`install`).

``shard(model, tp_size)`` does both on a loaded model; :func:`openautoglm.parallel.from_pretrained` cuts the
empty (meta) model first and reads only this rank's slices from the checkpoint. After either, the model is an
ordinary transformers model whose projections are narrower: ``forward`` and ``generate`` work as before, any
KV cache holds this rank's KV heads, and every rank returns the same full logits.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import _hf
from . import comm
from .config import ShardConfig
from .plan import ShardPlan, make_plan
from .slicing import narrow_module

log = logging.getLogger(__name__)


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[vocab_start, vocab_start + num_embeddings)`` of an embedding; ids outside read zeros, and the
    ranks' outputs are summed (one all-reduce). input ids: (batch, seq) -> (batch, seq, hidden)."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, vocab_size: int, group) -> None:
        nn.Module.__init__(self)
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.vocab_start, self.vocab_size, self.group = vocab_start, vocab_size, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        out = out.masked_fill(~inside.unsqueeze(-1), 0)
        return comm.all_reduce(out, self.group)

    def extra_repr(self) -> str:
        return f"rows [{self.vocab_start}, {self.vocab_start + self.num_embeddings}) of {self.vocab_size}"


def _sum_over_ranks(group, module, args, output):
    return comm.all_reduce(output, group)


def _gather_logits(group, module, args, output):
    return comm.all_gather_last(output, group)


def _refuse_save(*args, **kwargs):
    raise ValueError("this model is one rank's tensor-parallel shard; save the unsharded model instead "
                     "(load it without --tp / shard())")


def apply_plan(model: nn.Module, plan: ShardPlan) -> None:
    """Cut ``model`` (real or meta) in place to what rank ``plan.rank`` holds, and set the local head layouts."""
    head = model.get_submodule(plan.lm_head) if plan.lm_head else None
    for name, cut in plan.cuts.items():
        if plan.tied and name == plan.lm_head:
            continue  # the tied lm_head is re-pointed at the cut embedding below
        narrow_module(model.get_submodule(name), plan.module_tensors(name), cut.dim, cut.start, cut.stop)
    if plan.tied and head is not None:
        emb = model.get_submodule(plan.embedding)
        head.weight = emb.weight
        if plan.lm_head in plan.cuts:
            head.out_features = emb.weight.shape[0]
    for (i, attn), split in zip(_hf.separate_qkv_attention_modules(model), plan.layers):
        _hf.set_attention_layout(attn, split.kv_index)
        for attr, n in (("num_heads", split.n_q), ("num_key_value_heads", split.n_kv)):  # where a model keeps them
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, n)
    model.shard_plan = plan


def install(model: nn.Module, plan: ShardPlan, group, *, force: bool = False) -> None:
    """Add the collectives: one all-reduce after each row-parallel layer, the vocabulary-parallel embedding
    (one all-reduce) and the all-gather of the logits. Nothing is added for one rank unless ``force``
    (benchmarks time the hooks themselves on a one-rank group)."""
    if plan.tp_size == 1 and not force:
        return
    handles = []
    for name in plan.row_parallel:
        handles.append(model.get_submodule(name).register_forward_hook(functools.partial(_sum_over_ranks, group)))
    if plan.vocab is not None:
        emb = model.get_submodule(plan.embedding)
        size = emb.num_embeddings * plan.tp_size
        vpe = VocabParallelEmbedding(emb.weight, plan.vocab[0], size, group)
        model.set_input_embeddings(vpe)
        if plan.lm_head:
            head = model.get_submodule(plan.lm_head)
            if plan.tied:
                head.weight = vpe.weight
            handles.append(head.register_forward_hook(functools.partial(_gather_logits, group)))
    model._tp_hooks = handles


def shard(model: nn.Module, tp_size: int | None = None, config: ShardConfig | None = None, *, group=None) -> nn.Module:
    """Split ``model`` in place over the ranks of a tensor-parallel group; returns ``model``.

    Parameters
    ----------
    model : a loaded Llama-family causal LM (float, quantized with :mod:`openautoglm.quant`, head-pruned, low-rank),
        the same on every rank.
    tp_size : ranks sharing the model (short for ``ShardConfig(tp_size=...)``); default: the world size of
        ``torch.distributed`` (started by ``torchrun``; see :func:`~.comm.init_distributed`).
    config : a :class:`ShardConfig` (vocabulary split, uneven splits).
    group : a ``torch.distributed`` process group to use instead of the default one.

    The plan is checked before anything is cut or communicated: a split that cannot be made raises
    ``ValueError`` naming the layer, an unsupported architecture ``TypeError``. The plan is ``model.shard_plan``.
    """
    if getattr(model, "shard_plan", None) is not None:
        raise ValueError("model is already sharded (model.shard_plan is set); shard the unsharded model")
    config = ShardConfig.resolve(tp_size, config)
    want = config.tp_size or (comm.world_size() if group is None else torch.distributed.get_world_size(group))
    make_plan(model, want, 0, config)  # the plan's errors come before any group is needed
    tp, rank, group = comm.tp_group(want, group)
    plan = make_plan(model, tp, rank, ShardConfig.resolve(tp, config))
    apply_plan(model, plan)
    install(model, plan, group)
    model.save_pretrained = _refuse_save
    for note in plan.notes:
        log.info("%s", note)
    return model
