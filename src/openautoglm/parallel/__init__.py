"""Tensor parallelism on ``torch.distributed``: split a model's heads, MLP features and vocabulary over ranks.

>>> from openautoglm import parallel
>>> device = parallel.init_distributed()                       # under `torchrun --nproc-per-node 2`
>>> model = parallel.from_pretrained("open-autoglm-base", tp_size=2, device=device)   # reads only its slices
>>> # or: model = parallel.shard(openautoglm.from_pretrained(...), tp_size=2)

Float, quantized (w8a8, fp8, static, w8, w4: packed codes, scales and zero points cut consistently), head-pruned
and low-rank models split the same way; see :mod:`.plan` for the plan and its errors.

Design: like gpt-fast's ``tp.py`` and the inference fast path of transformers' own tensor parallelism, each rank
keeps plain local tensors and the row-parallel layers end in a ``torch.distributed`` all-reduce (a forward hook),
rather than DTensor parameters: ``parallelize_module``'s Colwise/RowwiseParallel shard ``nn.Linear`` and
``nn.Embedding`` only, while the packed quantized layouts and their kernels would each need DTensor sharding
rules, and per-op DTensor dispatch would tax eager decode. A layout only describes how it is cut
(``tp_granularity`` / ``tp_slices``).
"""

from __future__ import annotations

from .comm import all_gather_last, all_reduce, distributed, init_distributed, launched_by_torchrun, tp_group
from .config import ShardConfig
from .load import from_pretrained, read_rank_state
from .plan import Cut, LayerSplit, ShardPlan, make_plan
from .shard import VocabParallelEmbedding, apply_plan, install, shard
from .slicing import DROP, Slice, module_slices, narrow_module, read_slice

__all__ = [
    "shard", "from_pretrained", "ShardConfig", "ShardPlan", "make_plan", "init_distributed", "distributed",
    "launched_by_torchrun", "tp_group", "all_reduce", "all_gather_last", "Cut", "LayerSplit", "Slice", "DROP",
    "module_slices", "narrow_module", "read_slice", "read_rank_state", "apply_plan", "install",
    "VocabParallelEmbedding",
]
